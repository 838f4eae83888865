"""Haar wavelet modules. The arithmetic lives in `kernels`; these modules only hold the constant
filters under the released state-dict names so checkpoints load strictly and round-trip.

The filter values are fixed (spec 4.9). `constants()` gives them for checkpoints that lack them
(EMA dicts), and the loader checks that stored ones equal them.
"""
import itertools
import math

import torch
from torch import nn

import kernels
from encoder_service.model.cache import CausalCache
from kernels.haar_reference import HAAR2D_TAP, HAAR3D_TAP

NAMES_3D = ("h", "g", "hh", "gh", "h_v", "g_v", "hh_v", "gh_v")  # s = 4*tau + 2*eta + omega
NAMES_2D = ("aa", "ad", "da", "dd")  # LL, height-high, width-high, HH
_LOW, _HIGH = (1.0, 1.0), (1.0, -1.0)


def filters_3d() -> dict[str, torch.Tensor]:
    return {name: _outer((_HIGH if (s >> bit) & 1 else _LOW for bit in (2, 1, 0)), HAAR3D_TAP)
            for s, name in enumerate(NAMES_3D)}


def filters_2d() -> dict[str, torch.Tensor]:
    return {name: _outer((_HIGH if (k >> bit) & 1 else _LOW for bit in (0, 1)), HAAR2D_TAP)  # k = eta + 2*omega
            for k, name in enumerate(NAMES_2D)}


def _outer(factors, tap: float) -> torch.Tensor:
    """tap * the outer product of 1-D filters, as a (1, 1, 2, ...) conv weight. Computed in Python:
    tensor arithmetic on the meta device (model construction) imports torch._dynamo (~3 s a load)."""
    factors = list(factors)
    values = [tap * math.prod(f[i] for f, i in zip(factors, index))
              for index in itertools.product((0, 1), repeat=len(factors))]
    return torch.tensor(values).reshape(1, 1, *[2] * len(factors))


class _Holder(nn.Module):
    """An empty module, so a constant can live at `<name>_conv.conv.weight` like the official one."""


class _HaarModule(nn.Module):
    def constants(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The state-dict entries this module should hold, by full key."""
        return {prefix + key: value for key, value in self._layout().items()}


class HaarWaveletTransform3D(_HaarModule):
    """Encoder 3D transform's filters, stored as frozen params `<f>_conv.conv.weight` (the encoder
    computes all its transforms at once with kernels.haar_pyramid)."""

    def __init__(self):
        super().__init__()
        for name, value in filters_3d().items():
            holder = _Holder()
            holder.conv = _Holder()
            holder.conv.weight = nn.Parameter(value, requires_grad=False)
            setattr(self, f"{name}_conv", holder)

    def _layout(self):
        return {f"{name}_conv.conv.weight": v for name, v in filters_3d().items()}


class _BufferHaar(_HaarModule):
    def __init__(self, filters):
        super().__init__()
        self._filters = filters
        for name, value in filters().items():
            self.register_buffer(name, value)

    def _layout(self):
        return self._filters()


class HaarWaveletTransform2D(_BufferHaar):
    """The encoder's level-1 2D transform's filters (computed in kernels.haar_pyramid)."""

    def __init__(self):
        super().__init__(filters_2d)


class InverseHaarWaveletTransform2D(_BufferHaar):
    def __init__(self):
        super().__init__(filters_2d)

    def forward(self, x, cache=None):
        return kernels.inverse_haar2d(x)


class InverseHaarWaveletTransform3D(_BufferHaar):
    """Decoder 3D inverse: drops output frame 0 (the causal pad) on a clip's first chunk only."""

    def __init__(self):
        super().__init__(filters_3d)

    def forward(self, x, cache: CausalCache | None = None, add_low=None):
        first = cache is None or not cache.seen(self)
        return kernels.inverse_haar3d(x, drop_first=first, add_low=add_low)
