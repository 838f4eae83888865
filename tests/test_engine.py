"""LatentEncoder, the encoder actors' engine: every fast path against the eager float32 model.
Tolerances: float32 paths <= 1e-5 relative (summation order only); bf16 latents <= 3 % relative L2
of the float32 mean on the tiny random-weight golden model (its measured value is printed)."""
import numpy as np
import pytest
import torch
from conftest import GOLDEN

from encoder_service.encode.engine import ClipRejected, LatentEncoder, auto_chunk_frames, numerics
from encoder_service.model import WFVAE
from encoder_service.options import PRECISIONS

CKPT = str(GOLDEN / "weights.safetensors")


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 17, 32, 48, 3), dtype=torch.uint8, generator=g).numpy()


def eager_mean(frames: np.ndarray) -> torch.Tensor:
    vae = WFVAE.from_pretrained(CKPT)
    x = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    return vae.encode(x).mean


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("chunk, channels_last", [(None, False), (4, False), (8, True)])
def test_fp32_engine_equals_eager_model(frames, chunk, channels_last):
    engine = LatentEncoder.load(CKPT, precision="fp32", device="cpu", chunk_frames=chunk, channels_last=channels_last)
    out = engine.encode(frames)
    assert out.mean.dtype == torch.float32 and bool(out.finite.all())
    assert rel_l2(out.mean, eager_mean(frames)) <= 1e-5


def test_bf16_latents_close_to_fp32(frames):
    bf16 = LatentEncoder.load(CKPT, precision="bf16", device="cpu", chunk_frames=8).encode(frames)
    fp32 = LatentEncoder.load(CKPT, precision="fp32", device="cpu", chunk_frames=8).encode(frames)
    err = rel_l2(bf16.mean, fp32.mean)
    print(f"bf16 vs fp32 mean, relative L2: {err:.4f}")
    assert bf16.mean.dtype == torch.bfloat16 and err <= 0.03


def test_non_finite_input_is_flagged(frames):
    engine = LatentEncoder.load(CKPT, precision="fp32", device="cpu")
    bad = frames.astype(np.float32)
    bad[1] = np.nan
    assert engine.encode(bad).finite.tolist() == [True, False]


def test_chunk_choice():
    engine = LatentEncoder.load(CKPT, precision="fp32", device="cpu", chunk_frames=16)
    assert engine.chunk_for((1, 33, 64, 64, 3)) == 16 and engine.chunk_for((1, 17, 64, 64, 3)) is None
    assert auto_chunk_frames(torch.device("cpu"), 64 * 64, torch.bfloat16) is None  # CPU: whole clips
    with pytest.raises(ValueError, match="precision must be one of"):
        LatentEncoder.load(CKPT, precision="fp16")


def test_the_callers_model_is_not_changed():
    vae = WFVAE.from_pretrained(CKPT)
    before = {k: (v.dtype, v.stride()) for k, v in vae.state_dict().items()}
    engine = LatentEncoder(vae, precision="bf16", channels_last=True)
    assert engine.vae.dtype == torch.bfloat16
    assert {k: (v.dtype, v.stride()) for k, v in vae.state_dict().items()} == before


@pytest.mark.parametrize("shape", [(1, 16, 32, 48, 3), (1, 17, 30, 48, 3), (17, 32, 48, 3)])
def test_clips_the_model_cannot_take_are_rejected_before_any_work(shape):
    engine = LatentEncoder.load(CKPT, precision="fp32", device="cpu")
    with pytest.raises(ClipRejected):
        engine.encode(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("name", ["fp32", "tf32", "bf16"])
def test_numerics_are_set_per_call_and_restored(name):
    """fp32 means fp32: TF32 is off inside an fp32 encode, on only for the tf32 policy."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, cudnn.benchmark, matmul.allow_tf32)
    with numerics(PRECISIONS[name]):
        assert cudnn.allow_tf32 == matmul.allow_tf32 == (name == "tf32") and cudnn.benchmark
    assert (cudnn.allow_tf32, cudnn.benchmark, matmul.allow_tf32) == before
