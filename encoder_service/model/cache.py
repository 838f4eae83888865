"""Explicit causal-cache state for chunked / streaming inference.

A `CausalCache` belongs to one clip (or one batch of same-shape clips) being streamed through the
encoder or the decoder. Every layer with temporal context keeps its entry here, keyed by the layer,
so the modules themselves stay stateless: one model serves any number of clips, of any lengths,
one after another or at the same time. `cache=None` everywhere means "the whole clip at once".

Steady state: from a clip's second chunk on, every chunk of the same length leaves context of the
same shapes, so `keep` writes it into the buffer the previous chunk left (a copy, no allocation):
the cache's tensors keep their addresses, which is what lets a CUDA graph replay the step
(model/graphs.py).
"""
import torch
from torch import nn


class CausalCache:
    def __init__(self):
        self._entries: dict[nn.Module, object] = {}
        self.last = False  # set before a clip's last chunk: layers keep no context for a next one

    def get(self, layer: nn.Module, default=None):
        return self._entries.get(layer, default)

    def put(self, layer: nn.Module, value) -> None:
        self._entries[layer] = value

    def keep(self, layer: nn.Module, value: torch.Tensor) -> None:
        """Store `value` (a view into a chunk's buffer) for the next chunk: into the layer's buffer
        when one of its shape is there (stable address, nothing allocated), else a copy."""
        held = self._entries.get(layer)
        if torch.is_tensor(held) and held.shape == value.shape and held.dtype == value.dtype:
            held.copy_(value)
        else:
            self._entries[layer] = value.clone()

    def tensors(self) -> dict:
        """The layers' tensors (what a graph must find at fixed addresses)."""
        return {k: v for k, v in self._entries.items() if torch.is_tensor(v)}

    def load(self, other: "CausalCache") -> bool:
        """Copy `other`'s state into this cache's buffers in place; False (nothing changed) if the
        two do not hold the same layers with the same shapes."""
        mine, theirs = self.tensors(), other.tensors()
        if self._entries.keys() != other._entries.keys() or any(
                mine[k].shape != v.shape or mine[k].dtype != v.dtype for k, v in theirs.items()):
            return False
        for k, v in theirs.items():
            mine[k].copy_(v)
        return True

    def copy(self) -> "CausalCache":
        """A cache with its own buffers holding this one's state."""
        out = CausalCache()
        out._entries = {k: v.clone() if torch.is_tensor(v) else v for k, v in self._entries.items()}
        return out

    def seen(self, layer: nn.Module) -> bool:
        """True from the second chunk on, for layers whose first chunk is special."""
        first = layer not in self._entries
        self._entries[layer] = True
        return not first


def keep_context(padded: torch.Tensor, layer: nn.Module, cache: CausalCache | None, kernel_t: int,
                 stride_t: int) -> None:
    """Store what the next chunk's window needs (copied: a view would pin the whole chunk); nothing
    on a clip's last chunk, where no one will read it."""
    if cache is None or cache.last:
        return
    consumed = (padded.shape[2] - kernel_t) // stride_t * stride_t + stride_t
    cache.keep(layer, padded[:, :, consumed:])
