"""Shared fixtures: the golden-small official reference (copied from the WF-VAE reference set),
small random models, the kernel backend."""
import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run on the CPU, in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (must be set before triton is imported)

from safetensors.torch import load_file  # noqa: E402

import kernels  # noqa: E402
from encoder_service import WFVAE, WFVAEConfig  # noqa: E402

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden-small"


@pytest.fixture(scope="session")
def golden_dir(tmp_path_factory) -> Path:
    """The golden weights laid out as a released WF-VAE-L directory."""
    d = tmp_path_factory.mktemp("golden_ckpt")
    shutil.copy(GOLDEN / "config.json", d / "config.json")
    shutil.copy(GOLDEN / "weights.safetensors", d / "diffusion_pytorch_model.safetensors")
    return d


@pytest.fixture(scope="session")
def golden_input() -> torch.Tensor:
    return load_file(GOLDEN / "input.safetensors")["video"]


@pytest.fixture(scope="session")
def golden_outputs() -> dict[str, dict[str, torch.Tensor]]:
    return {torch.float32: load_file(GOLDEN / "outputs.safetensors"),
            torch.float64: load_file(GOLDEN / "outputs_fp64.safetensors")}


@pytest.fixture(scope="session")
def golden_vae(golden_dir):
    """golden_vae(dtype) -> the golden model in that dtype (cached)."""
    cache = {}

    def get(dtype=torch.float32):
        if dtype not in cache:
            cache[dtype] = WFVAE.from_pretrained(golden_dir, dtype=dtype)
        return cache[dtype]
    return get


def small_config(**overrides) -> WFVAEConfig:
    """A tiny WF-VAE with the S structure (connect_res_layer_num=2) for fast random-weight tests."""
    base = dict(latent_dim=8, base_channels=8, encoder_energy_flow_hidden_size=8,
                decoder_energy_flow_hidden_size=8, connect_res_layer_num=2, scale=(0.18215,) * 8,
                shift=(0.0,) * 8, name="tiny-s")
    return WFVAEConfig(**{**base, **overrides})


def random_vae(config: WFVAEConfig, seed: int = 0, dtype=torch.float32) -> WFVAE:
    """Untrained model with non-trivial norm parameters (so LayerNorm affine terms are exercised)."""
    torch.manual_seed(seed)
    vae = WFVAE(config).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return vae.to(dtype)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture
def backend():
    """backend(name) switches the kernel backend for one test; the previous choice comes back after."""
    from kernels import dispatch
    before = dispatch._backend
    yield kernels.use_backend
    dispatch._backend = before


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster for the job tests, declaring a logical GPU (the GPU scheduling path
    runs, the encoders use --device cpu); started once and shared by the modules that use it (Ray
    stops it at exit). Workers inherit the driver's environment: the local S3 server's credentials
    are set first."""
    import ray
    if not ray.is_initialized():
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
