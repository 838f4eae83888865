"""Triton kernels against their PyTorch references, on CPU through the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, so the kernels run in a fresh
Python process. Tolerances, relative to the largest output magnitude:
* fp32 <= 1e-6 (the kernels may associate sums differently from the reference);
* LayerNorm bf16 <= 2^-6 (two bf16 ulps: both round the same float32 value independently);
* Haar bf16 <= 2^-5: the kernel sums in float32 and rounds once, the reference rounds every
  butterfly stage in bf16 (up to 3 stages per level, and level 2 is built on rounded level 1).
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELUDE = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    torch.manual_seed(0)

    def rel(got, want):
        return (got.double() - want.double()).abs().max().item() / max(want.double().abs().max().item(), 1e-30)
""")

LAYER_NORM = textwrap.dedent("""
    from kernels.norm_reference import channel_layer_norm as reference
    from kernels.norm_triton import channel_layer_norm as fused
    worst = {}
    for shape in [(1, 3, 1, 1, 1), (2, 12, 5, 6, 7), (1, 24, 1, 8, 8), (1, 40, 3, 5, 3)]:
        for layout in ("ncthw", "channels_last_3d"):
            for silu in (False, True):
                for dtype in (torch.float32, torch.bfloat16):
                    x = (torch.randn(shape) * 3 + 1).to(dtype)
                    if layout == "channels_last_3d":
                        x = x.to(memory_format=torch.channels_last_3d)
                    w, b = 1 + 0.2 * torch.randn(shape[1]), 0.1 * torch.randn(shape[1])
                    got, want = fused(x, w, b, 1e-6, silu), reference(x, w, b, 1e-6, silu)
                    assert got.dtype == x.dtype and got.shape == x.shape
                    assert got.stride() == x.stride(), "output keeps the input's memory layout"
                    worst[str(dtype)] = max(worst.get(str(dtype), 0.0), rel(got, want))
    print(worst)
    assert worst["torch.float32"] <= 1e-6, worst
    assert worst["torch.bfloat16"] <= 2 ** -6, worst
    print("ok")
""")

HAAR_PYRAMID = textwrap.dedent("""
    from kernels import haar_reference as R
    from kernels import haar_triton as K
    worst = {}
    cases = [(1, True), (5, True), (9, True), (4, False), (8, False)]
    for (t, first), (h, w) in [(c, s) for c in cases for s in [(8, 8), (18, 22), (36, 20), (7, 9), (2, 2)]]:
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.rand(2, 3, t, h, w) * 2 - 1).to(dtype)
            for got, want in zip(K.haar_pyramid(x, first), R.haar_pyramid(x, first)):
                assert got.shape == want.shape and got.dtype == dtype, (got.shape, want.shape)
                if want.numel():
                    worst[str(dtype)] = max(worst.get(str(dtype), 0.0), rel(got, want))
    # uint8 frames (B, T, H, W, 3) as a permuted view, the [0, 255] -> [-1, 1] mapping fused
    frames = torch.randint(0, 256, (2, 9, 20, 24, 3), dtype=torch.uint8)
    view = frames.permute(0, 4, 1, 2, 3)
    for dtype in (torch.float32, torch.bfloat16):
        for got, want in zip(K.haar_pyramid(view, True, dtype), R.haar_pyramid(view, True, dtype)):
            assert got.dtype == dtype
            worst["uint8->" + str(dtype)] = max(worst.get("uint8->" + str(dtype), 0.0), rel(got, want))
    # chunk by chunk (first chunk 4k+1 frames with the causal pad, then 4k frames, no state) == whole clip
    x = torch.rand(1, 3, 17, 16, 24) * 2 - 1
    whole = K.haar_pyramid(x, True)
    pieces = [K.haar_pyramid(x[:, :, :5], True), K.haar_pyramid(x[:, :, 5:13], False),
              K.haar_pyramid(x[:, :, 13:], False)]
    for level, full in enumerate(whole):
        assert torch.equal(torch.cat([p[level] for p in pieces], dim=2), full), level
    for t, first in ((3, True), (5, False)):
        try:
            K.haar_pyramid(torch.zeros(1, 3, t, 8, 8), first)
            raise AssertionError("accepted a chunk length the pyramid cannot split")
        except ValueError as exc:
            assert "4k+1 frames" in str(exc)
    print(worst)
    assert worst["torch.float32"] <= 1e-6 and worst["uint8->torch.float32"] <= 1e-6, worst
    assert worst["torch.bfloat16"] <= 2 ** -5 and worst["uint8->torch.bfloat16"] <= 2 ** -5, worst
    print("ok")
""")

INVERSE_HAAR = textwrap.dedent("""
    from kernels import haar_reference as R
    from kernels import haar_triton as K
    worst = {}
    for (b, c, t, h, w) in [(1, 3, 1, 1, 1), (2, 3, 3, 5, 7), (1, 2, 4, 8, 6)]:
        for dtype in (torch.float32, torch.bfloat16):
            add = torch.randn(b, c, t, h, w).to(dtype)
            x3, x2 = torch.randn(b, 8 * c, t, h, w).to(dtype), torch.randn(b, 4 * c, t, h, w).to(dtype)
            for low in (None, add):
                pairs = [(K.inverse_haar2d(x2, low), R.inverse_haar2d(x2, low))]
                pairs += [(K.inverse_haar3d(x3, d, low), R.inverse_haar3d(x3, d, low)) for d in (True, False)]
                for got, want in pairs:
                    assert got.shape == want.shape and got.dtype == dtype
                    worst[str(dtype)] = max(worst.get(str(dtype), 0.0), rel(got, want))
    # a non-contiguous input (a channel slice) is accepted
    x3 = torch.randn(1, 30, 2, 4, 4)[:, 3:27]
    assert torch.allclose(K.inverse_haar3d(x3), R.inverse_haar3d(x3), atol=1e-6)
    print(worst)
    assert worst["torch.float32"] <= 1e-6 and worst["torch.bfloat16"] <= 2 ** -5, worst
    print("ok")
""")

MODEL = textwrap.dedent("""
    # the whole model with WFVAE_KERNELS=triton (every op with a kernel) reproduces golden-small
    os.environ["WFVAE_KERNELS"] = "triton"
    import kernels
    report = kernels.kernel_report("cpu")
    assert all(report[op] == "triton" for op in ("channel_layer_norm", "haar_pyramid", "inverse_haar3d",
                                                 "inverse_haar2d")), report
    from safetensors.torch import load_file
    from encoder_service import WFVAE
    vae = WFVAE.from_pretrained("tests/data/golden-small/weights.safetensors")
    ref = load_file("tests/data/golden-small/outputs.safetensors")
    x = load_file("tests/data/golden-small/input.safetensors")["video"]
    assert (vae.encode(x).moments - ref["moments"]).abs().max() <= 1e-4
    assert (vae.encode(x, chunk_frames=4).moments - ref["moments"]).abs().max() <= 1e-4
    assert (vae.decode(ref["mean"]) - ref["decoded"]).abs().max() <= 2e-4
    assert (vae.decode(ref["mean"], chunk_latents=1) - ref["decoded"]).abs().max() <= 2e-4
    # uint8 frames straight into the pyramid kernel give the latents of their float mapping
    frames = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    want = vae.encode(frames.float() / 127.5 - 1).mean
    assert (vae.encode(frames).mean - want).abs().max() <= 1e-5
    print("ok")
""")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["LAYER_NORM", "HAAR_PYRAMID", "INVERSE_HAAR", "MODEL"])
def test_kernel_under_interpreter(name):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", PRELUDE + globals()[name]], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.rstrip().endswith("ok"), result.stdout
