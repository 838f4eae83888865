"""How wide a kernel's offsets must be, decided from the offsets a call actually touches.

The Triton kernels compute element offsets from program ids and strides. int32 arithmetic is the
fast default; it is only wrong when an offset reaches 2^31, which depends on the strides of the
tensors passed (a time-chunk view of a long 1080p clip batch has few elements but huge strides),
never on their element counts. `needs_int64` answers that question per call; kernels take the
answer as a compile-time flag and widen their indices to int64 before any multiplication.
"""
import torch

INT32_LIMIT = 2 ** 31


def largest_offset(shape, strides) -> int:
    """The largest element offset (from the first element) that a tensor of this shape and these
    strides reaches; 0 for an empty tensor."""
    if any(n == 0 for n in shape):
        return 0
    return sum((n - 1) * abs(s) for n, s in zip(shape, strides))


def needs_int64(*tensors: torch.Tensor) -> bool:
    """True if any offset into any of the tensors is out of int32 range."""
    return any(largest_offset(t.shape, t.stride()) >= INT32_LIMIT for t in tensors)
