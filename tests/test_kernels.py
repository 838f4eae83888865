"""Triton kernels against their PyTorch references on every layout the model hands them.

On a machine without CUDA the kernels run under the Triton interpreter (conftest sets
TRITON_INTERPRET=1 before triton is imported); with CUDA every tensor is made on the GPU and the
kernels compile for it (benchmarks/gpu_acceptance.sh also runs them under compute-sanitizer).
Every call runs inside guard bands (tests/guards.py): a write outside the output, into the input
or an unmasked read of the NaN sentinel fails the test. Tolerances, relative to the largest output
magnitude:
* fp32 <= 1e-6 (the kernels may associate sums differently from the reference);
* LayerNorm bf16 <= 2^-6 (two bf16 ulps: both round the same float32 value independently);
* Haar bf16 <= 2^-5: the kernel sums in float32 and rounds once, the reference rounds every
  butterfly stage in bf16 (up to 3 stages per level, and level 2 is built on rounded level 1).
"""
import pytest
import torch
from guards import LAYOUTS, like, run_guarded

import kernels
from kernels import haar_reference, haar_triton, norm_reference, norm_triton
from kernels.offsets import INT32_LIMIT, largest_offset, needs_int64

FP32, BF16 = torch.float32, torch.bfloat16
NORM_TOL = {FP32: 1e-6, BF16: 2 ** -6}
HAAR_TOL = {FP32: 1e-6, BF16: 2 ** -5}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def check(got, want, dtype, tol):
    assert got.shape == want.shape and got.dtype == dtype, (got.shape, want.shape, got.dtype)
    if want.numel():
        assert rel(got, want) <= tol[dtype], rel(got, want)


@pytest.fixture(autouse=True)
def on_the_kernels_device():
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        yield


@pytest.fixture
def wide(monkeypatch):
    """Force the int64-offset variant of every kernel (its inputs here are small)."""
    for module in (norm_triton, haar_triton):
        monkeypatch.setattr(module, "needs_int64", lambda *tensors: True)


# ---- channel LayerNorm (+ SiLU) -------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("silu", [False, True])
def test_layer_norm_layouts(layout, dtype, silu):
    x = like((2, 12, 3, 5, 7), dtype, layout)
    w, b = 1 + 0.2 * torch.randn(12), 0.1 * torch.randn(12)
    got = run_guarded(norm_triton.channel_layer_norm, x, w, b, 1e-6, silu)
    check(got, norm_reference.channel_layer_norm(x, w, b, 1e-6, silu), dtype, NORM_TOL)
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last_3d):
        assert got.stride() == x.stride(), "a dense input's memory layout is kept"


@pytest.mark.parametrize("shape", [(2, 12, 1, 5, 3), (1, 40, 1, 1, 1), (1, 3, 1, 1, 1)])
def test_layer_norm_t1_mixed_layouts(shape):
    """T = 1 with one operand channels_last_3d: strides no dense layout has (every 1-frame tail)."""
    x = like(shape, FP32, "t1_mixed")
    w, b = 1 + 0.2 * torch.randn(shape[1]), 0.1 * torch.randn(shape[1])
    got = run_guarded(norm_triton.channel_layer_norm, x, w, b, 1e-6, True)
    check(got, norm_reference.channel_layer_norm(x, w, b, 1e-6, True), FP32, NORM_TOL)


def test_layer_norm_int64_offsets(wide):
    x = like((2, 40, 2, 3, 5), BF16, "channel_slice_cl")
    w, b = torch.randn(40), torch.randn(40)
    got = run_guarded(norm_triton.channel_layer_norm, x, w, b, 1e-6, True)
    check(got, norm_reference.channel_layer_norm(x, w, b, 1e-6, True), BF16, NORM_TOL)


# ---- Haar pyramid -----------------------------------------------------------------------------
def frames_view(b, t, h, w, start=0, stop=None):
    """uint8 (B, T, H, W, 3) frames, a time chunk of them, as the permuted (B, 3, T, H, W) view the
    engine passes (no copy)."""
    frames = torch.randint(0, 256, (b, t, h, w, 3), dtype=torch.uint8)
    return frames[:, start:stop].permute(0, 4, 1, 2, 3)


PYRAMID_CASES = {
    # name: (input, first chunk?, compute dtype)
    "float_b2": (lambda: torch.rand(2, 3, 5, 18, 22) * 2 - 1, True, None),
    "float_bf16": (lambda: (torch.rand(2, 3, 5, 18, 22) * 2 - 1).to(BF16), True, None),
    "float_cl3d_odd": (lambda: (torch.rand(1, 3, 5, 7, 9) * 2 - 1).contiguous(memory_format=torch.channels_last_3d),
                       True, None),
    "float_later_chunk": (lambda: torch.rand(1, 3, 8, 8, 8) * 2 - 1, False, None),
    "uint8_view": (lambda: frames_view(2, 9, 20, 24), True, FP32),
    "uint8_view_bf16": (lambda: frames_view(2, 9, 20, 24), True, BF16),
    "uint8_first_chunk_view": (lambda: frames_view(2, 13, 16, 16, 0, 5), True, FP32),
    "uint8_later_chunk_view": (lambda: frames_view(2, 13, 16, 16, 5, 9), False, FP32),
    "uint8_single_frame": (lambda: frames_view(2, 1, 16, 24), True, FP32),
}


@pytest.mark.parametrize("case", PYRAMID_CASES)
def test_haar_pyramid_layouts(case):
    make, first, dtype = PYRAMID_CASES[case]
    x = make()
    got = run_guarded(haar_triton.haar_pyramid, x, first, dtype)
    want = haar_reference.haar_pyramid(x, first, dtype)
    for g, r in zip(got, want):
        check(g, r, r.dtype, HAAR_TOL)


def test_haar_pyramid_int64_offsets(wide):
    x = frames_view(2, 9, 16, 16, 5, 9)
    for g, r in zip(run_guarded(haar_triton.haar_pyramid, x, False, FP32),
                    haar_reference.haar_pyramid(x, False, FP32)):
        check(g, r, FP32, HAAR_TOL)


def test_haar_pyramid_chunks_equal_the_whole_clip():
    """First chunk 4k+1 frames with the causal pad, then 4k frames, no state: bit-equal."""
    x = torch.rand(1, 3, 17, 16, 24) * 2 - 1
    whole = haar_triton.haar_pyramid(x, True)
    pieces = [haar_triton.haar_pyramid(x[:, :, :5], True), haar_triton.haar_pyramid(x[:, :, 5:13], False),
              haar_triton.haar_pyramid(x[:, :, 13:], False)]
    for level, full in enumerate(whole):
        assert torch.equal(torch.cat([p[level] for p in pieces], dim=2), full), level


@pytest.mark.parametrize("t, first", [(3, True), (5, False)])
def test_haar_pyramid_refuses_unsplittable_chunks(t, first):
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        haar_triton.haar_pyramid(torch.zeros(1, 3, t, 8, 8), first)


# ---- inverse Haar (+ energy-flow addition) ----------------------------------------------------
INVERSE_CASES = [  # (x layout, add_low layout or None, (B, C, T, H, W), dtype)
    ("ncthw", None, (2, 3, 2, 5, 7), FP32),
    ("channels_last_3d", "channels_last_3d", (2, 3, 2, 5, 7), FP32),
    ("channels_last_3d", "ncthw", (1, 3, 1, 4, 6), BF16),
    ("channel_slice", "time_slice", (2, 3, 2, 4, 4), FP32),
    ("channel_slice_cl", "channel_slice", (1, 2, 3, 3, 5), BF16),
    ("time_slice", None, (2, 3, 1, 4, 4), FP32),
]


@pytest.mark.parametrize("x_layout, add_layout, shape, dtype", INVERSE_CASES)
def test_inverse_haar_layouts(x_layout, add_layout, shape, dtype):
    b, c, t, h, w = shape
    add = like(shape, dtype, add_layout) if add_layout else None
    x2, x3 = like((b, 4 * c, t, h, w), dtype, x_layout), like((b, 8 * c, t, h, w), dtype, x_layout)
    check(run_guarded(haar_triton.inverse_haar2d, x2, add), haar_reference.inverse_haar2d(x2, add), dtype, HAAR_TOL)
    for drop in (True, False):
        check(run_guarded(haar_triton.inverse_haar3d, x3, drop, add),
              haar_reference.inverse_haar3d(x3, drop, add), dtype, HAAR_TOL)


def test_inverse_haar_int64_offsets(wide):
    x, add = like((2, 24, 2, 3, 5), FP32, "channels_last_3d"), like((2, 3, 2, 3, 5), FP32, "channel_slice")
    check(run_guarded(haar_triton.inverse_haar3d, x, True, add), haar_reference.inverse_haar3d(x, True, add),
          FP32, HAAR_TOL)
    x2 = like((2, 12, 2, 3, 5), FP32, "time_slice")
    check(run_guarded(haar_triton.inverse_haar2d, x2, add), haar_reference.inverse_haar2d(x2, add), FP32, HAAR_TOL)


# ---- offsets: the int32/int64 decision ----------------------------------------------------------
def test_offset_width_follows_the_offsets_touched_not_the_element_count():
    """The engine's time-chunk views of a 1080p x 65-frame batch of 7: few elements, huge strides."""
    frames = torch.empty((7, 65, 1080, 1920, 3), dtype=torch.uint8, device="meta")
    chunk = frames[:, 48:65].permute(0, 4, 1, 2, 3)
    assert chunk.numel() < INT32_LIMIT and needs_int64(chunk)
    assert not needs_int64(frames[:6, 48:65].permute(0, 4, 1, 2, 3))
    # a 1080p x 65-frame decode: ~12e8 elements per output is fine in int32 (the old guard refused it)
    out = torch.empty((1, 3, 65, 1080, 1920), device="meta")
    assert not needs_int64(out)
    assert largest_offset((2, 3), (3, 1)) == 5 and largest_offset((0, 3), (3, 1)) == 0


# ---- dispatch -----------------------------------------------------------------------------------
def test_float64_goes_to_the_reference_under_triton(backend):
    backend("triton")
    assert kernels.kernel_report("cpu", torch.float64) == {op: "torch" for op in kernels.dispatch.OPS}
    report = kernels.kernel_report("cpu", FP32)
    assert {op for op, impl in report.items() if impl == "triton"} == {
        "channel_layer_norm", "haar_pyramid", "inverse_haar3d", "inverse_haar2d"}
    x = torch.randn(1, 8, 2, 3, 3, dtype=torch.float64)
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    assert torch.equal(kernels.channel_layer_norm(x, w, b), norm_reference.channel_layer_norm(x, w, b))


def test_backend_choice_is_checked(backend):
    with pytest.raises(ValueError, match="not one of auto, torch, triton"):
        backend("bogus")
