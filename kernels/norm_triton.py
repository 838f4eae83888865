"""Fused channel LayerNorm (+ SiLU) in Triton, for (B, C, T, H, W) in NCTHW or channels_last_3d.

One program normalises BLOCK_P positions of one batch element over all C channels: it reads the
(C, BLOCK_P) tile once, keeps float32 statistics, and writes normalised (and SiLU'd) values once,
where the reference moves the tensor to channels-last and back and makes two more passes for SiLU.
Reference: kernels/norm_reference.py:channel_layer_norm.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _channel_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, P, stride_b, stride_c, stride_p, eps,
                         SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_p, pid_b = tl.program_id(0), tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (c[:, None] < C) & (p[None, :] < P)
    offs = pid_b * stride_b + c[:, None] * stride_c + p[None, :] * stride_p
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    diff = tl.where(mask, x - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / C + eps)
    w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    y = diff * rstd[None, :] * w[:, None] + b[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _position_stride(x: torch.Tensor) -> int | None:
    """The stride between consecutive (t, h, w) positions if they form one uniform run, else None."""
    _, _, t, h, w = x.shape
    sp = x.stride(4)
    return sp if x.stride(3) == w * sp and x.stride(2) == h * w * sp else None


def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
                       silu: bool = False) -> torch.Tensor:
    if x.ndim != 5:
        raise ValueError(f"channel_layer_norm expects (B, C, T, H, W), got {tuple(x.shape)}")
    if _position_stride(x) is None:
        x = x.contiguous()
    b, c, t, h, w = x.shape
    y = torch.empty_like(x)  # keeps the input's memory format
    block_c = triton.next_power_of_2(c)
    block_p = max(1, min(64, 4096 // block_c))
    grid = (triton.cdiv(t * h * w, block_p), b)
    _channel_norm_kernel[grid](x, weight, bias, y, c, t * h * w, x.stride(0), x.stride(1), _position_stride(x),
                               eps, SILU=silu, BLOCK_C=block_c, BLOCK_P=block_p)
    return y
