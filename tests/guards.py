"""Guard bands: catch out-of-bounds kernel writes that do not crash.

Every tensor a kernel reads or writes is placed inside a larger buffer filled with a sentinel
(NaN for floats, 0xA5 for integers). After the call, every element of every buffer that the
tensor does not own (the bands before and after, and the holes of a strided view) must still hold
the sentinel; inputs must be unchanged. Outputs are guarded by allocating them through
`guarded_allocations()`, which routes the kernel's torch.empty / torch.empty_like into such buffers.
"""
import contextlib
from unittest import mock

import torch

BAND = 257  # elements of sentinel on each side (odd, so no alignment hides an overrun)
_EMPTY, _EMPTY_LIKE = torch.empty, torch.empty_like


def _sentinel(dtype):
    return float("nan") if dtype.is_floating_point else 0xA5


class Guarded:
    """A tensor of the given shape and strides living at offset BAND inside a sentinel buffer."""

    def __init__(self, shape, strides, dtype):
        span = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
        self.buffer = _EMPTY(BAND + span + BAND, dtype=dtype)
        self.buffer.fill_(_sentinel(dtype))
        self.tensor = self.buffer.as_strided(shape, strides, BAND)
        owned = torch.zeros(self.buffer.numel(), dtype=torch.bool)
        owned.as_strided(shape, strides, BAND).fill_(True)
        self.outside = ~owned

    def untouched(self) -> bool:
        rest = self.buffer[self.outside]
        if rest.dtype.is_floating_point:
            return bool(torch.isnan(rest).all())
        return bool((rest == _sentinel(rest.dtype)).all())


def guard(t: torch.Tensor) -> tuple[torch.Tensor, Guarded]:
    """A copy of t with t's shape and strides (dense or not) inside a guard buffer."""
    g = Guarded(t.shape, t.stride(), t.dtype)
    g.tensor.copy_(t)
    return g.tensor, g


def like(shape, dtype, layout: str, base_channels: int | None = None):
    """A (B, C, T, H, W) tensor of random values in one of the layouts the model produces:
    ncthw, channels_last_3d, channel_slice (the last C channels of a wider NCTHW tensor, like the
    decoder's flow channels), channel_slice_cl (the same of a channels_last_3d tensor),
    time_slice (frames 1.. of a longer clip), t1_mixed (T = 1 sum of an NCTHW and a
    channels_last_3d tensor: the odd strides of a size-1 dimension)."""
    b, c, t, h, w = shape
    cl = torch.channels_last_3d

    def rand(*s):
        return (torch.randn(*s) * 2 + 0.5).to(dtype)

    if layout == "ncthw":
        return rand(*shape)
    if layout == "channels_last_3d":
        return rand(*shape).contiguous(memory_format=cl)
    if layout == "channel_slice":
        return rand(b, c + (base_channels or 5), t, h, w)[:, -c:]
    if layout == "channel_slice_cl":
        return rand(b, c + (base_channels or 5), t, h, w).contiguous(memory_format=cl)[:, -c:]
    if layout == "time_slice":
        return rand(b, c, t + 2, h, w)[:, :, 1:-1]
    if layout == "t1_mixed":
        assert t == 1
        return rand(*shape) + rand(*shape).contiguous(memory_format=cl)
    raise ValueError(layout)


LAYOUTS = ("ncthw", "channels_last_3d", "channel_slice", "channel_slice_cl", "time_slice")


@contextlib.contextmanager
def guarded_allocations():
    """Route torch.empty / torch.empty_like into guard buffers; yields the list of Guarded made.
    On exit (no exception) every guard must be intact."""
    made: list[Guarded] = []

    def empty(*args, **kwargs):
        meta = _EMPTY(*args, **{**kwargs, "device": "meta"})
        made.append(Guarded(meta.shape, meta.stride(), meta.dtype))
        return made[-1].tensor

    def empty_like(x, **kwargs):
        meta = _EMPTY_LIKE(x, **{**kwargs, "device": "meta"})
        made.append(Guarded(meta.shape, meta.stride(), meta.dtype))
        return made[-1].tensor

    with mock.patch.object(torch, "empty", empty), mock.patch.object(torch, "empty_like", empty_like):
        yield made
    assert made, "the kernel allocated no output through torch.empty/empty_like"
    bad = [tuple(g.tensor.shape) for g in made if not g.untouched()]
    assert not bad, f"writes outside the output tensors of shape {bad}"


def run_guarded(fn, *inputs, **kwargs):
    """fn(*guarded copies of the tensor inputs) with guarded outputs; checks inputs untouched and
    unchanged. Returns fn's result."""
    guarded, guards, originals = [], [], []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            gx, g = guard(x)
            guarded.append(gx)
            guards.append(g)
            originals.append((gx, x.clone()))
        else:
            guarded.append(x)
    with guarded_allocations():
        out = fn(*guarded, **kwargs)
    assert all(g.untouched() for g in guards), "a kernel wrote outside its input tensors"
    assert all(torch.equal(gx.nan_to_num(), x.nan_to_num()) for gx, x in originals), "a kernel changed its input"
    return out
