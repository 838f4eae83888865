"""Explicit causal-cache state for chunked / streaming inference.

A `CausalCache` belongs to one clip (or one batch of same-shape clips) being streamed through the
encoder or the decoder. Every layer with temporal context keeps its entry here, keyed by the layer,
so the modules themselves stay stateless: one model serves any number of clips, of any lengths,
one after another or at the same time. `cache=None` everywhere means "the whole clip at once".
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

    def seen(self, layer: nn.Module) -> bool:
        """True from the second chunk on, for layers whose first chunk is special."""
        first = layer not in self._entries
        self._entries[layer] = True
        return not first


def keep_context(padded: torch.Tensor, layer: nn.Module, cache: CausalCache | None, kernel_t: int,
                 stride_t: int) -> None:
    """Store what the next chunk's window needs (a copy: a view would pin the whole chunk); nothing
    on a clip's last chunk, where no one will read it."""
    if cache is None or cache.last:
        return
    consumed = (padded.shape[2] - kernel_t) // stride_t * stride_t + stride_t
    cache.put(layer, padded[:, :, consumed:].clone())
