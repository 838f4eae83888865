"""Haar wavelet transforms of WF-VAE as plain tensor arithmetic (the reference for kernels/haar.py).

Layouts follow the released checkpoints (spec 4.9):
* 3D: 2x2x2 blocks, sub-band s = 4*tau + 2*eta + omega (1 = high-pass along time, height, width),
  taps +-0.3536 (the float32 literal of the checkpoint, not 1/sqrt(8)).
* 2D: 2x2 blocks per frame, order LL, H-high, W-high, HH (k = eta + 2*omega), taps +-1/2.
* Channels are sub-band major: output channel s*C + c.
Odd spatial sizes are floored like the official stride-2 convolutions.
"""
import numpy as np
import torch

HAAR3D_TAP = float(np.float32(0.3536))  # what the checkpoint stores; widened exactly for float64
HAAR2D_TAP = 0.5


def _split(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) = (even + odd, even - odd) along `dim`, which must have even length."""
    pairs = x.unflatten(dim, (-1, 2))
    even, odd = pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)
    return even + odd, even - odd


def _merge(low: torch.Tensor, high: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse butterfly of _split (without the 1/2): interleave low+high, low-high along `dim`."""
    return torch.stack((low + high, low - high), dim=dim + 1).flatten(dim, dim + 1)


def _even_hw(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    return x[..., :h, :w]


def haar3d(x: torch.Tensor, causal_pad: bool = True) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, 8C, T', H/2, W/2).

    With causal_pad (a clip's first chunk) frame 0 is repeated once in front, so T = 2k+1 gives
    k+1 frames; without it (later chunks) T must be even and gives T/2 frames.
    """
    x = _even_hw(x)
    if causal_pad:
        x = torch.cat([x[:, :, :1], x], dim=2)
    bands = []
    for t in _split(x, 2):
        for h in _split(t, 3):
            bands.extend(_split(h, 4))
    return torch.stack(bands, dim=1).flatten(1, 2) * HAAR3D_TAP


def haar2d(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, 4C, T, H/2, W/2), per frame."""
    x = _even_hw(x)
    h_lo, h_hi = _split(x, 3)
    (ll, lh), (hl, hh) = _split(h_lo, 4), _split(h_hi, 4)
    # order k = eta + 2*omega: LL, height-high, width-high, both
    return torch.stack([ll, hl, lh, hh], dim=1).flatten(1, 2) * HAAR2D_TAP


def _add_low(x: torch.Tensor, add_low: torch.Tensor | None, bands: int) -> torch.Tensor:
    """x with add_low added to its low band (channels 0..C-1): the decoder's energy-flow sum."""
    if add_low is None:
        return x
    c = x.shape[1] // bands
    return torch.cat([x[:, :c] + add_low, x[:, c:]], dim=1)


def inverse_haar3d(x: torch.Tensor, drop_first: bool = True, add_low: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 8C, T, H, W) -> (B, C, 2T, 2H, 2W); drop_first removes frame 0 (the causal pad).
    add_low (B, C, T, H, W) is added to the low band first."""
    x = _add_low(x, add_low, 8)
    b = x.unflatten(1, (2, 2, 2, -1))  # (B, tau, eta, omega, C, T, H, W)
    w = _merge(b[:, :, :, 0], b[:, :, :, 1], dim=6)  # width
    h = _merge(w[:, :, 0], w[:, :, 1], dim=4)  # height
    out = _merge(h[:, 0], h[:, 1], dim=2) * HAAR3D_TAP  # time
    return out[:, :, 1:] if drop_first else out


def inverse_haar2d(x: torch.Tensor, add_low: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 4C, T, H, W) -> (B, C, T, 2H, 2W), exact inverse of haar2d (add_low: as inverse_haar3d)."""
    x = _add_low(x, add_low, 4)
    ll, hl, lh, hh = x.unflatten(1, (4, -1)).unbind(1)
    rows_lo = _merge(ll, lh, dim=4)
    rows_hi = _merge(hl, hh, dim=4)
    return _merge(rows_lo, rows_hi, dim=3) * HAAR2D_TAP


def to_unit_range(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> [-1, 1], computed in float32 (exact for float32), then cast to dtype."""
    return frames.float().div(127.5).sub(1.0).to(dtype)


def haar_pyramid(x: torch.Tensor, causal_pad: bool = True, dtype: torch.dtype | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format):
    """The encoder's three wavelet inputs from one video chunk (spec section 5, steps 1-2).

    x: (B, 3, T, H, W) float in [-1, 1], or uint8 in [0, 255] (mapped to [-1, 1] in dtype, default
    float32). Returns (level-0 3D coefficients (B,24,..), level-1 2D coefficients of the LLL band
    (B,12,..), level-2 3D coefficients of the LL band of that (B,24,..)), each dense in
    `memory_format` (channels_last_3d: the layout the encoder's convolutions run in on CUDA).
    """
    if x.dtype == torch.uint8:
        x = to_unit_range(x, dtype or torch.float32)
    elif dtype is not None:
        x = x.to(dtype)
    coeffs = haar3d(x, causal_pad)
    l1 = haar2d(coeffs[:, :3])
    l2 = haar3d(l1[:, :3], causal_pad)
    return tuple(t.contiguous(memory_format=memory_format) for t in (coeffs, l1, l2))
