"""The model as it runs on CUDA, executed on the CPU: Triton kernels (interpreter), 5-D weights in
channels_last_3d as the engine keeps them on CUDA, and cuDNN's output-layout rule emulated (a conv3d
output is channels_last_3d when its input or its weight is), so every kernel sees the strides a GPU
run hands it. Compared with the PyTorch reference path on plain NCTHW tensors. On a CUDA machine
the same tests run on the GPU with real cuDNN layouts and compiled kernels (no emulation).

Tolerances: float32, 1e-4 x max|reference| (summation order differs between layouts and between
kernel and reference: observed ~1e-6); float64 golden: 1e-10 (float64 always takes the reference).
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs
from torch._prims_common import suggest_memory_format
from torch.overrides import TorchFunctionMode

from encoder_service.encode.engine import numerics, to_channels_last_3d
from encoder_service.model.blocks import blocked_attention
from encoder_service.options import PRECISIONS

CL = torch.channels_last_3d
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class CudnnLayout(TorchFunctionMode):
    """conv3d outputs take the layout cuDNN gives them: channels_last_3d if the input or the
    weight suggests it, NCTHW otherwise."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.conv3d or func is torch.conv3d:
            channels_last = any(suggest_memory_format(t) == CL for t in args[:2])
            out = out.contiguous(memory_format=CL if channels_last else torch.contiguous_format)
        return out


@pytest.fixture(scope="module")
def models(golden_vae):
    """(reference model, model laid out as on CUDA): the golden weights, float32."""
    vae = copy.deepcopy(golden_vae(torch.float32)).to(DEVICE)  # (the cached one stays as it is)
    cuda_like = copy.deepcopy(vae)
    to_channels_last_3d(cuda_like)
    return vae, cuda_like


def video(b, t, h=16, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, h, w, 3), dtype=torch.uint8, generator=g).permute(0, 4, 1, 2, 3).to(DEVICE)


@pytest.fixture(autouse=True)
def fp32_means_fp32():
    """TF32 off on CUDA, as the engine's fp32 policy: the tolerances below are fp32 ones."""
    with numerics(PRECISIONS["fp32"]):
        yield


def cuda_layouts():
    """cuDNN's layouts: emulated on the CPU, the real ones on CUDA."""
    return CudnnLayout() if DEVICE == "cpu" else contextlib.nullcontext()


def close(got, want):
    return max_abs(got, want) <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("t, chunk", [(9, None), (1, None), (17, 8), (21, 16), (13, 4)],
                         ids=["whole", "one-frame", "chunked", "one-latent-tail", "4-frame-chunks"])
def test_encode_on_cuda_layouts(models, backend, t, chunk):
    vae, cuda_like = models
    x = video(2, t)
    backend("torch")
    want = vae.encode(x, chunk_frames=chunk).moments
    backend("triton")
    with cuda_layouts():
        got = cuda_like.encode(x, chunk_frames=chunk).moments
    assert close(got, want)


@pytest.mark.parametrize("t, chunk", [(3, None), (1, None), (3, 2), (3, 1)],
                         ids=["whole", "one-latent", "one-latent-tail", "1-latent-chunks"])
def test_decode_on_cuda_layouts(models, backend, t, chunk):
    vae, cuda_like = models
    z = torch.randn(2, vae.config.latent_dim, t, 2, 3, generator=torch.Generator().manual_seed(t)).to(DEVICE)
    backend("torch")
    want = vae.decode(z, chunk_latents=chunk)
    backend("triton")
    with cuda_layouts():
        got = cuda_like.decode(z, chunk_latents=chunk)
    assert close(got, want)


def test_golden_fp32_through_the_kernels(golden_vae, golden_input, golden_outputs, backend):
    """The golden model, weights laid out as on CUDA, fp32 through the Triton kernels on DEVICE:
    within the golden tolerance of the official outputs (tests/test_golden.py)."""
    vae, ref = copy.deepcopy(golden_vae(torch.float32)).to(DEVICE), golden_outputs[torch.float32]
    to_channels_last_3d(vae)
    backend("triton")
    with cuda_layouts():
        posterior = vae.encode(golden_input.to(DEVICE))
        decoded = vae.decode(ref["mean"].to(DEVICE))
    assert max_abs(posterior.moments.cpu(), ref["moments"]) <= 1e-4
    assert max_abs(decoded.cpu(), ref["decoded"]) <= 2e-4


def test_golden_float64_under_the_triton_backend(golden_vae, golden_input, golden_outputs, backend):
    backend("triton")
    vae, ref = golden_vae(torch.float64), golden_outputs[torch.float64]
    assert max_abs(vae.encode(golden_input.double()).moments, ref["moments"]) <= 1e-10
    assert max_abs(vae.decode(ref["mean"]), ref["decoded"]) <= 1e-10


@pytest.mark.parametrize("frames, n", [(3, 37), (1, 64)])
def test_blocked_attention_equals_math_attention(frames, n):
    q, k, v = (torch.randn(frames, 1, n, 24, generator=torch.Generator().manual_seed(i)) for i in range(3))
    scores = torch.softmax(q @ k.transpose(-1, -2) / 24 ** 0.5, dim=-1)
    math = scores @ v
    for score_bytes in (4 * frames * n * 5, 4 * frames * n, 1):  # 5-row blocks, 1-row blocks, minimum
        assert max_abs(blocked_attention(q, k, v, score_bytes), math) <= 1e-5
    assert max_abs(blocked_attention(q, k, v), math) <= 1e-5  # one block
