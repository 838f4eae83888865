"""Public API behaviour: input checks that say what to do, the posterior, shapes and devices."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import max_abs, random_vae, small_config

from encoder_service import DiagonalGaussian


@pytest.fixture(scope="module")
def vae():
    return random_vae(small_config())


@pytest.mark.parametrize("shape, dtype, message", [
    ((1, 3, 8, 16, 16), torch.float32, "4k\\+1 frames.*keep the first 5 frames or pad to 9"),
    ((1, 3, 9, 20, 16), torch.float32, "multiples of 8.*crop to 16x16"),
    ((1, 9, 16, 16, 3), torch.float32, "3 \\(RGB\\) channels.*permute"),
    ((1, 3, 9, 16), torch.float32, "\\(B, 3, T, H, W\\)"),
    ((1, 3, 9, 16, 16), torch.int16, "float video in \\[-1, 1\\] or uint8 frames"),
])
def test_bad_video_is_refused_with_a_fix(vae, shape, dtype, message):
    x = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        vae.encode(x)


def test_out_of_range_values_are_refused(vae):
    with pytest.raises(ValueError, match="pass \\[0, 255\\] frames as uint8"):
        vae.encode(torch.full((1, 3, 5, 16, 16), 200.0))


@pytest.mark.parametrize("chunk", [None, 4])
def test_uint8_frames_equal_their_float_mapping(vae, chunk):
    """(B, T, H, W, 3) uint8 frames, passed as a permuted view (no copy), encode like x / 127.5 - 1."""
    frames = torch.randint(0, 256, (2, 9, 16, 24, 3), dtype=torch.uint8)
    view = frames.permute(0, 4, 1, 2, 3)
    got = vae.encode(view, chunk_frames=chunk).mean
    want = vae.encode(view.float() / 127.5 - 1, chunk_frames=chunk).mean
    assert (got - want).abs().max() <= 1e-5  # float32: only the order of the scaling differs


def test_bad_latent_is_refused(vae):
    with pytest.raises(ValueError, match="\\(B, 8, t, h, w\\)"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))


@pytest.mark.parametrize("t, h, w", [(1, 8, 8), (5, 16, 24), (9, 24, 16)])
def test_shapes(vae, t, h, w):
    x = torch.rand(2, 3, t, h, w) * 2 - 1
    post = vae.encode(x)
    assert post.mean.shape == post.logvar.shape == (2, 8, (t - 1) // 4 + 1, h // 8, w // 8)
    assert vae.decode(post.mode()).shape == (2, 3, t, h, w)


def test_batch_equals_clips_one_by_one(vae):
    x = torch.rand(3, 3, 9, 16, 16) * 2 - 1
    together = vae.encode(x).mean
    alone = torch.cat([vae.encode(x[i:i + 1]).mean for i in range(3)])
    assert max_abs(together, alone) <= 1e-5


def test_posterior_clamps_and_samples_reproducibly():
    moments = torch.cat([torch.zeros(1, 2, 1, 2, 2), torch.full((1, 2, 1, 2, 2), 50.0)], dim=1)
    post = DiagonalGaussian(moments)
    assert torch.all(post.logvar == 20.0) and torch.equal(post.mode(), post.mean)
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, post.mean)
    assert torch.allclose(post.std, torch.exp(torch.tensor(10.0)))


def test_float64_model(vae):
    vae64 = random_vae(small_config(), dtype=torch.float64)
    x = torch.rand(1, 3, 5, 16, 16, dtype=torch.float64) * 2 - 1
    assert vae64.encode(x).mean.dtype == torch.float64
    assert max_abs(vae64.encode(x).mean, vae.encode(x.float()).mean) <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(vae):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    gpu = random_vae(small_config()).cuda()
    assert max_abs(gpu.encode(x.cuda()).mean.cpu(), vae.encode(x).mean) <= 1e-4


def test_kernel_backend_choice(backend, vae):
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    backend("torch")
    reference = vae.encode(x).mean
    backend("auto")  # CPU tensors: the reference path
    assert torch.equal(vae.encode(x).mean, reference)


@pytest.mark.parametrize("value, expected", [("torch", "torch"), ("", "auto"), ("bogus", "not one of")])
def test_kernel_backend_is_read_from_the_environment_once(value, expected):
    code = "import kernels; print(kernels.kernel_backend())"
    env = {**os.environ, "WFVAE_KERNELS": value} if value else {k: v for k, v in os.environ.items()
                                                               if k != "WFVAE_KERNELS"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert expected in result.stdout + result.stderr
