"""Haar wavelet kernels of WF-VAE in Triton. Reference: kernels/haar_reference.py (same layouts,
same float32(0.3536) taps; sums may associate differently, so results agree to rounding).

* haar_pyramid: the encoder's three wavelet inputs in one pass over the video. One program owns
  a block of "cells" of one output frame m of level 2: a cell is the 8x8 pixels under one level-2
  position, i.e. 4x4 level-0 and 2x2 level-1 positions, over the (up to) 4 input frames of m. It
  reads those pixels once (float video in any layout, or uint8 frames with [0,255] -> [-1,1]
  fused) and writes level 0 (24 channels), level 1 (12) and level 2 (24). Causal first-frame
  replication: output frame f of a 3D level pairs input frames (max(2f-1, 0), 2f) on a clip's
  first chunk and (2f, 2f+1) on later ones, so later chunks need no state.
* inverse_haar3d / inverse_haar2d: one program per block of input positions of one frame and
  channel; writes the 8 (or 4) output pixels of each. `add_low` is added to the low band on
  load: the decoder's energy-flow addition without a concatenated copy. Inputs are read through
  their own strides (a channels_last_3d conv output or a channel slice needs no copy); the output
  is a new contiguous tensor.

Offsets: int32 unless an offset this call touches (input or output, from its strides) reaches
2^31, then every index is widened to int64 before it is multiplied (kernels/offsets.py). No
input is refused for its size.
"""
import torch
import triton
import triton.language as tl

from kernels.haar_reference import HAAR2D_TAP, HAAR3D_TAP
from kernels.offsets import needs_int64


@triton.jit
def _pixel(x_ptr, off, U8: tl.constexpr, mask):
    v = tl.load(x_ptr + off, mask=mask, other=0).to(tl.float32)
    if U8:
        v = v / 127.5 - 1.0
    return v


@triton.jit
def _haar8(p000, p001, p010, p011, p100, p101, p110, p111):
    """The 8 sub-bands of a 2x2x2 block p[dt][dy][dx], s = 4*tau + 2*eta + omega, untapped.
    Time first, then height, then width, as in the reference."""
    l00, l01, l10, l11 = p000 + p100, p001 + p101, p010 + p110, p011 + p111
    h00, h01, h10, h11 = p000 - p100, p001 - p101, p010 - p110, p011 - p111
    ll0, ll1, lh0, lh1 = l00 + l10, l01 + l11, l00 - l10, l01 - l11
    hl0, hl1, hh0, hh1 = h00 + h10, h01 + h11, h00 - h10, h01 - h11
    return ll0 + ll1, ll0 - ll1, lh0 + lh1, lh0 - lh1, hl0 + hl1, hl0 - hl1, hh0 + hh1, hh0 - hh1


@triton.jit
def _store8(ptr, off, band_stride, mask, tap, s0, s1, s2, s3, s4, s5, s6, s7):
    ty = ptr.dtype.element_ty
    tl.store(ptr + off, (s0 * tap).to(ty), mask=mask)
    tl.store(ptr + off + band_stride, (s1 * tap).to(ty), mask=mask)
    tl.store(ptr + off + 2 * band_stride, (s2 * tap).to(ty), mask=mask)
    tl.store(ptr + off + 3 * band_stride, (s3 * tap).to(ty), mask=mask)
    tl.store(ptr + off + 4 * band_stride, (s4 * tap).to(ty), mask=mask)
    tl.store(ptr + off + 5 * band_stride, (s5 * tap).to(ty), mask=mask)
    tl.store(ptr + off + 6 * band_stride, (s6 * tap).to(ty), mask=mask)
    tl.store(ptr + off + 7 * band_stride, (s7 * tap).to(ty), mask=mask)


@triton.jit
def _levels01(x_ptr, l0_ptr, l1_ptr, c, f, write, b, cy, cx, cell_ok, H0, W0, H1, W1,
              sx_b, sx_c, sx_t, sx_h, sx_w, s0_b, s0_c, s0_t, s0_h, s0_w, s1_b, s1_c, s1_t, s1_h, s1_w,
              CAUSAL: tl.constexpr, U8: tl.constexpr, BLOCK: tl.constexpr, TAP3: tl.constexpr,
              TAP2: tl.constexpr):
    """Level-0 and level-1 coefficients of channel c, frame f for a block of cells; returns the
    level-1 LL band (BLOCK, 4) that level 2 is made of. Tile position p = 4*q + d: q is the
    level-1 position in the cell, d the level-0 position under it (d = 2*dy + dx)."""
    p = tl.arange(0, 16)
    q, d = p // 4, p % 4
    h0 = 4 * cy[:, None] + 2 * (q // 2)[None, :] + (d // 2)[None, :]
    w0 = 4 * cx[:, None] + 2 * (q % 2)[None, :] + (d % 2)[None, :]
    ok0 = cell_ok[:, None] & (h0 < H0) & (w0 < W0)
    written = ok0 & ((tl.zeros_like(h0) + write) != 0)  # write: int flag, 0 for a duplicate frame
    if CAUSAL:
        t_even = tl.maximum(2 * f - 1, 0)
        t_odd = 2 * f
    else:
        t_even = 2 * f
        t_odd = 2 * f + 1
    base = b * sx_b + c * sx_c + (2 * h0) * sx_h + (2 * w0) * sx_w
    e, o = base + t_even * sx_t, base + t_odd * sx_t
    s0, s1, s2, s3, s4, s5, s6, s7 = _haar8(
        _pixel(x_ptr, e, U8, ok0), _pixel(x_ptr, e + sx_w, U8, ok0),
        _pixel(x_ptr, e + sx_h, U8, ok0), _pixel(x_ptr, e + sx_h + sx_w, U8, ok0),
        _pixel(x_ptr, o, U8, ok0), _pixel(x_ptr, o + sx_w, U8, ok0),
        _pixel(x_ptr, o + sx_h, U8, ok0), _pixel(x_ptr, o + sx_h + sx_w, U8, ok0))
    _store8(l0_ptr, b * s0_b + c * s0_c + f * s0_t + h0 * s0_h + w0 * s0_w, 3 * s0_c, written, TAP3,
            s0, s1, s2, s3, s4, s5, s6, s7)
    # level 1: 2D Haar of the LLL band (as stored) over each 2x2 group d of level-0 positions
    lll = tl.reshape((s0 * TAP3).to(l0_ptr.dtype.element_ty).to(tl.float32), (BLOCK, 4, 4))
    dd = tl.arange(0, 4)
    sign_h = (1 - 2 * (dd // 2)).to(tl.float32)[None, None, :]
    sign_w = (1 - 2 * (dd % 2)).to(tl.float32)[None, None, :]
    ll = tl.sum(lll, axis=2)
    hl = tl.sum(lll * sign_h, axis=2)
    lh = tl.sum(lll * sign_w, axis=2)
    hh = tl.sum(lll * sign_h * sign_w, axis=2)
    h1 = 2 * cy[:, None] + (dd // 2)[None, :]
    w1 = 2 * cx[:, None] + (dd % 2)[None, :]
    ok1 = cell_ok[:, None] & (h1 < H1) & (w1 < W1) & ((tl.zeros_like(h1) + write) != 0)
    off1 = b * s1_b + c * s1_c + f * s1_t + h1 * s1_h + w1 * s1_w
    ty = l1_ptr.dtype.element_ty
    tl.store(l1_ptr + off1, (ll * TAP2).to(ty), mask=ok1)  # k = eta + 2*omega: LL, H-high, W-high, HH
    tl.store(l1_ptr + off1 + 3 * s1_c, (hl * TAP2).to(ty), mask=ok1)
    tl.store(l1_ptr + off1 + 6 * s1_c, (lh * TAP2).to(ty), mask=ok1)
    tl.store(l1_ptr + off1 + 9 * s1_c, (hh * TAP2).to(ty), mask=ok1)
    # what level 2 reads is what level 1 stored: round like the stored value
    return (ll * TAP2).to(ty).to(tl.float32)


@triton.jit
def _pyramid_kernel(x_ptr, l0_ptr, l1_ptr, l2_ptr, n_cells, cells_w, H0, W0, H1, W1, H2, W2,
                    sx_b, sx_c, sx_t, sx_h, sx_w, s0_b, s0_c, s0_t, s0_h, s0_w, s1_b, s1_c, s1_t, s1_h, s1_w,
                    s2_b, s2_c, s2_t, s2_h, s2_w, CAUSAL: tl.constexpr, U8: tl.constexpr, WIDE: tl.constexpr,
                    BLOCK: tl.constexpr, TAP3: tl.constexpr, TAP2: tl.constexpr):
    pid, m, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if WIDE:
        pid, m, b = pid.to(tl.int64), m.to(tl.int64), b.to(tl.int64)
    cell = pid * BLOCK + tl.arange(0, BLOCK)
    cell_ok = cell < n_cells
    cy, cx = cell // cells_w, cell % cells_w
    if CAUSAL:  # level-2 frame m pairs level-1 frames (max(2m-1, 0), 2m)
        fa = tl.maximum(2 * m - 1, 0)
        fb = 2 * m
    else:
        fa = 2 * m
        fb = 2 * m + 1
    ok2 = cell_ok & (cy < H2) & (cx < W2)
    dd = tl.arange(0, 4)
    sign_h = (1 - 2 * (dd // 2)).to(tl.float32)[None, :]
    sign_w = (1 - 2 * (dd % 2)).to(tl.float32)[None, :]
    for c in tl.static_range(3):
        a = _levels01(x_ptr, l0_ptr, l1_ptr, c, fa, fa * 0 + 1, b, cy, cx, cell_ok, H0, W0, H1, W1,
                      sx_b, sx_c, sx_t, sx_h, sx_w, s0_b, s0_c, s0_t, s0_h, s0_w, s1_b, s1_c, s1_t, s1_h, s1_w,
                      CAUSAL, U8, BLOCK, TAP3, TAP2)
        z = _levels01(x_ptr, l0_ptr, l1_ptr, c, fb, (fb != fa).to(tl.int32), b, cy, cx, cell_ok, H0, W0, H1, W1,
                      sx_b, sx_c, sx_t, sx_h, sx_w, s0_b, s0_c, s0_t, s0_h, s0_w, s1_b, s1_c, s1_t, s1_h, s1_w,
                      CAUSAL, U8, BLOCK, TAP3, TAP2)
        lo, hi = a + z, a - z
        off2 = b * s2_b + c * s2_c + m * s2_t + cy * s2_h + cx * s2_w
        _store8(l2_ptr, off2, 3 * s2_c, ok2, TAP3,
                tl.sum(lo, axis=1), tl.sum(lo * sign_w, axis=1), tl.sum(lo * sign_h, axis=1),
                tl.sum(lo * sign_h * sign_w, axis=1), tl.sum(hi, axis=1), tl.sum(hi * sign_w, axis=1),
                tl.sum(hi * sign_h, axis=1), tl.sum(hi * sign_h * sign_w, axis=1))


def _pyramid_frames(t: int, causal_pad: bool) -> tuple[int, int]:
    if causal_pad and (t - 1) % 4 == 0:
        return (t + 1) // 2, (t + 3) // 4
    if not causal_pad and t % 4 == 0:
        return t // 2, t // 4
    raise ValueError(f"haar_pyramid needs 4k+1 frames on a clip's first chunk and 4k frames on later "
                     f"chunks, got {t} ({'first' if causal_pad else 'later'} chunk)")


def haar_pyramid(x: torch.Tensor, causal_pad: bool = True, dtype: torch.dtype | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format):
    """(B, 3, T, H, W) float in [-1, 1] or uint8 in [0, 255] (any strides: a permuted view of
    (B, T, H, W, 3) frames works) -> level-0 (B,24,..), level-1 (B,12,..), level-2 (B,24,..), each
    written dense in `memory_format` (channels_last_3d: the encoder's convolutions read them as they are)."""
    b, c, t, h, w = x.shape
    if c != 3:
        raise ValueError(f"haar_pyramid expects 3 channels, got {c}")
    dtype = dtype or (x.dtype if x.is_floating_point() else torch.float32)
    t0, t2 = _pyramid_frames(t, causal_pad)
    h0, w0 = h // 2, w // 2
    h1, w1, h2, w2 = h0 // 2, w0 // 2, h0 // 4, w0 // 4
    l0, l1, l2 = (torch.empty(shape, dtype=dtype, device=x.device, memory_format=memory_format)
                  for shape in ((b, 24, t0, h0, w0), (b, 12, t0, h1, w1), (b, 24, t2, h2, w2)))
    cells_w = triton.cdiv(w0, 4)
    n_cells = triton.cdiv(h0, 4) * cells_w
    if l0.numel() == 0:
        return l0, l1, l2
    block = 16
    grid = (triton.cdiv(n_cells, block), t2, b)
    _pyramid_kernel[grid](x, l0, l1, l2, n_cells, cells_w, h0, w0, h1, w1, h2, w2, *x.stride(),
                          *l0.stride(), *l1.stride(), *l2.stride(), CAUSAL=causal_pad, U8=x.dtype == torch.uint8,
                          WIDE=needs_int64(x, l0, l1, l2), BLOCK=block, TAP3=HAAR3D_TAP, TAP2=HAAR2D_TAP)
    return l0, l1, l2


@triton.jit
def _band(x_ptr, add_ptr, x_off, band, band_stride, add_off, mask, ADD: tl.constexpr):
    v = tl.load(x_ptr + x_off + band * band_stride, mask=mask, other=0.0).to(tl.float32)
    if ADD:  # passed for the low band only
        v += tl.load(add_ptr + add_off, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _inverse_block(C, H, W, sx_b, sx_c, sx_t, sx_h, sx_w, sa_b, sa_c, sa_t, sa_h, sa_w,
                   WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of input positions of one (batch, channel, frame): band k of a
    position is at x_off + k * band_stride of the (B, BANDS*C, T, H, W) input, the matching
    add_low element at add_off."""
    pid, t, bc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if WIDE:
        pid, t, bc = pid.to(tl.int64), t.to(tl.int64), bc.to(tl.int64)
    b, c = bc // C, bc % C
    pos = pid * BLOCK + tl.arange(0, BLOCK)
    h, w = pos // W, pos % W
    x_off = b * sx_b + c * sx_c + t * sx_t + h * sx_h + w * sx_w
    add_off = b * sa_b + c * sa_c + t * sa_t + h * sa_h + w * sa_w
    return b, c, t, pos < H * W, h, w, x_off, add_off, C * sx_c


@triton.jit
def _store_2x2(y_ptr, base, Wo, mask, tap, v00, v01, v10, v11):
    """Output pixels (2h, 2w), (2h, 2w+1), (2h+1, 2w), (2h+1, 2w+1) from base = (2h, 2w)."""
    ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + base, (v00 * tap).to(ty), mask=mask)
    tl.store(y_ptr + base + 1, (v01 * tap).to(ty), mask=mask)
    tl.store(y_ptr + base + Wo, (v10 * tap).to(ty), mask=mask)
    tl.store(y_ptr + base + Wo + 1, (v11 * tap).to(ty), mask=mask)


@triton.jit
def _inverse3d_kernel(x_ptr, add_ptr, y_ptr, C, H, W, T_out, drop,
                      sx_b, sx_c, sx_t, sx_h, sx_w, sa_b, sa_c, sa_t, sa_h, sa_w,
                      ADD: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr, TAP: tl.constexpr):
    b, c, t, mask, h, w, off, add_off, bs = _inverse_block(C, H, W, sx_b, sx_c, sx_t, sx_h, sx_w,
                                                           sa_b, sa_c, sa_t, sa_h, sa_w, WIDE, BLOCK)
    # bands s = 4*tau + 2*eta + omega; merge width, then height, then time (as the reference)
    b0 = _band(x_ptr, add_ptr, off, 0, bs, add_off, mask, ADD)
    b1 = _band(x_ptr, add_ptr, off, 1, bs, add_off, mask, False)
    b2 = _band(x_ptr, add_ptr, off, 2, bs, add_off, mask, False)
    b3 = _band(x_ptr, add_ptr, off, 3, bs, add_off, mask, False)
    b4 = _band(x_ptr, add_ptr, off, 4, bs, add_off, mask, False)
    b5 = _band(x_ptr, add_ptr, off, 5, bs, add_off, mask, False)
    b6 = _band(x_ptr, add_ptr, off, 6, bs, add_off, mask, False)
    b7 = _band(x_ptr, add_ptr, off, 7, bs, add_off, mask, False)
    w00e, w00o, w01e, w01o = b0 + b1, b0 - b1, b2 + b3, b2 - b3   # (tau, eta) = (0,0), (0,1)
    w10e, w10o, w11e, w11o = b4 + b5, b4 - b5, b6 + b7, b6 - b7   # (1,0), (1,1)
    # height: rows 2h (eta sum) and 2h+1 (eta difference), per tau and width parity
    r0ee, r0eo, r0oe, r0oo = w00e + w01e, w00o + w01o, w00e - w01e, w00o - w01o
    r1ee, r1eo, r1oe, r1oo = w10e + w11e, w10o + w11o, w10e - w11e, w10o - w11o
    Ho, Wo = 2 * H, 2 * W
    for dt in tl.static_range(2):
        sign = 1.0 - 2.0 * dt
        to = 2 * t + dt - drop
        ok = mask & ((h * 0 + to) >= 0)  # a block mask (a scalar condition is not one everywhere)
        base = ((b * C + c) * T_out + to) * Ho * Wo + (2 * h) * Wo + 2 * w
        _store_2x2(y_ptr, base, Wo, ok, TAP, r0ee + sign * r1ee, r0eo + sign * r1eo, r0oe + sign * r1oe,
                   r0oo + sign * r1oo)


@triton.jit
def _inverse2d_kernel(x_ptr, add_ptr, y_ptr, C, H, W, T,
                      sx_b, sx_c, sx_t, sx_h, sx_w, sa_b, sa_c, sa_t, sa_h, sa_w,
                      ADD: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr, TAP: tl.constexpr):
    b, c, t, mask, h, w, off, add_off, bs = _inverse_block(C, H, W, sx_b, sx_c, sx_t, sx_h, sx_w,
                                                           sa_b, sa_c, sa_t, sa_h, sa_w, WIDE, BLOCK)
    ll = _band(x_ptr, add_ptr, off, 0, bs, add_off, mask, ADD)
    hl = _band(x_ptr, add_ptr, off, 1, bs, add_off, mask, False)
    lh = _band(x_ptr, add_ptr, off, 2, bs, add_off, mask, False)
    hh = _band(x_ptr, add_ptr, off, 3, bs, add_off, mask, False)
    lo_e, lo_o, hi_e, hi_o = ll + lh, ll - lh, hl + hh, hl - hh  # width merge of the low/high rows
    Wo = 2 * W
    base = ((b * C + c) * T + t) * 4 * H * W + (2 * h) * Wo + 2 * w
    _store_2x2(y_ptr, base, Wo, mask, TAP, lo_e + hi_e, lo_o + hi_o, lo_e - hi_e, lo_o - hi_o)


def _inverse_args(x: torch.Tensor, bands: int, add_low: torch.Tensor | None):
    if x.ndim != 5 or x.shape[1] % bands:
        raise ValueError(f"expected (B, {bands}C, T, H, W), got {tuple(x.shape)}")
    b, cb, t, h, w = x.shape
    c = cb // bands
    if add_low is not None and tuple(add_low.shape) != (b, c, t, h, w):
        raise ValueError(f"add_low must be {(b, c, t, h, w)}, got {tuple(add_low.shape)}")
    add = x if add_low is None else add_low.to(x.dtype)
    return add, (b, c, t, h, w)


def _launch(kernel, x, add, y, add_low, shape, *scalars, tap):
    b, c, t, h, w = shape
    if y.numel():
        block = 256
        kernel[(triton.cdiv(h * w, block), t, b * c)](
            x, add, y, c, h, w, *scalars, *x.stride(), *add.stride(), ADD=add_low is not None,
            WIDE=needs_int64(x, add, y), BLOCK=block, TAP=tap)
    return y


def inverse_haar3d(x: torch.Tensor, drop_first: bool = True, add_low: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 8C, T, H, W) [+ add_low (B, C, T, H, W) on the low band] -> (B, C, 2T - drop, 2H, 2W)."""
    add, (b, c, t, h, w) = _inverse_args(x, 8, add_low)
    drop = int(drop_first and t > 0)
    y = torch.empty((b, c, 2 * t - drop, 2 * h, 2 * w), dtype=x.dtype, device=x.device)
    return _launch(_inverse3d_kernel, x, add, y, add_low, (b, c, t, h, w), 2 * t - drop, drop, tap=HAAR3D_TAP)


def inverse_haar2d(x: torch.Tensor, add_low: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 4C, T, H, W) [+ add_low (B, C, T, H, W) on the LL band] -> (B, C, T, 2H, 2W)."""
    add, (b, c, t, h, w) = _inverse_args(x, 4, add_low)
    y = torch.empty((b, c, t, 2 * h, 2 * w), dtype=x.dtype, device=x.device)
    return _launch(_inverse2d_kernel, x, add, y, add_low, (b, c, t, h, w), t, tap=HAAR2D_TAP)
