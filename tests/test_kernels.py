"""Triton kernels against their PyTorch references, on CPU through the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, so the kernels run in a fresh
Python process. Tolerances, relative to the largest output magnitude: fp32 <= 1e-6; bf16 <= 2^-6
(two bf16 ulps: the kernel and the reference round the same float32 value independently).
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from kernels.norm_reference import channel_layer_norm as reference
    from kernels.norm_triton import channel_layer_norm as fused
    torch.manual_seed(0)
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
                    err = (got.double() - want.double()).abs().max().item() / want.double().abs().max().item()
                    worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)
    print(worst)
    assert worst["torch.float32"] <= 1e-6, worst
    assert worst["torch.bfloat16"] <= 2 ** -6, worst
    # the whole model with WFVAE_KERNELS=triton reproduces golden-small in float32
    os.environ["WFVAE_KERNELS"] = "triton"
    import kernels
    assert kernels.kernel_report("cpu")["channel_layer_norm"] == "triton"
    sys.path.insert(0, "tests")
    from safetensors.torch import load_file
    from encoder_service import WFVAE
    vae = WFVAE.from_pretrained("tests/data/golden-small/weights.safetensors")
    ref = load_file("tests/data/golden-small/outputs.safetensors")
    x = load_file("tests/data/golden-small/input.safetensors")["video"]
    assert (vae.encode(x).moments - ref["moments"]).abs().max() <= 1e-4
    assert (vae.decode(ref["mean"]) - ref["decoded"]).abs().max() <= 2e-4
    print("golden ok")
""")


@pytest.mark.slow
def test_layer_norm_silu_kernel_and_model_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "golden ok" in result.stdout
