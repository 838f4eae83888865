"""Fused channel LayerNorm (+ SiLU) in Triton for (B, C, T, H, W) tensors of any strides.

One program normalises BLOCK_P positions of one batch element over all C channels: it reads the
(C, BLOCK_P) tile once, keeps float32 statistics, and writes normalised (and SiLU'd) values once,
where the reference moves the tensor to channels-last and back and makes two more passes for SiLU.
`out=` writes the result into a given view (the model passes the frames of a causal convolution's
input buffer), so the causal context never costs a concatenated copy.
Input and output offsets each come from their own five strides, so channel slices (the decoder's
flow channels), time slices, channels_last_3d, and the odd strides of size-1 dims (T = 1 sums of
mixed layouts) are all read in place; the output is dense in the input's memory format.
Offsets are int32 unless an offset this call touches reaches 2^31 (kernels/offsets.py), then int64.
Reference: kernels/norm_reference.py:channel_layer_norm.
"""
import torch
import triton
import triton.language as tl

from kernels.offsets import needs_int64


@triton.jit
def _channel_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, P, H, W, eps,
                         sx_b, sx_c, sx_t, sx_h, sx_w, sy_b, sy_c, sy_t, sy_h, sy_w,
                         SILU: tl.constexpr, WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_p, batch = tl.program_id(0), tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    if WIDE:
        pid_p, batch, c = pid_p.to(tl.int64), batch.to(tl.int64), c.to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    t, hw = p // (H * W), p % (H * W)
    h, w = hw // W, hw % W
    mask = (c[:, None] < C) & (p[None, :] < P)
    x_off = batch * sx_b + c[:, None] * sx_c + (t * sx_t + h * sx_h + w * sx_w)[None, :]
    y_off = batch * sy_b + c[:, None] * sy_c + (t * sy_t + h * sy_h + w * sy_w)[None, :]
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    diff = tl.where(mask, x - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / C + eps)
    wt = tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    bs = tl.load(b_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    y = diff * rstd[None, :] * wt[:, None] + bs[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)


def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
                       silu: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    if x.ndim != 5:
        raise ValueError(f"channel_layer_norm expects (B, C, T, H, W), got {tuple(x.shape)}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"channel_layer_norm: out {tuple(out.shape)} {out.dtype} is not x's "
                         f"{tuple(x.shape)} {x.dtype}")
    b, c, t, h, w = x.shape
    # out: written through its strides (a frame slice of a convolution's input buffer); otherwise
    # dense in the input's memory format (same strides when x is dense)
    y = torch.empty_like(x) if out is None else out
    if y.numel() == 0:
        return y
    block_c = triton.next_power_of_2(c)
    block_p = max(1, min(64, 4096 // block_c))
    grid = (triton.cdiv(t * h * w, block_p), b)
    _channel_norm_kernel[grid](x, weight, bias, y, c, t * h * w, h, w, eps, *x.stride(), *y.stride(),
                               SILU=silu, WIDE=needs_int64(x, y), BLOCK_C=block_c, BLOCK_P=block_p)
    return y
