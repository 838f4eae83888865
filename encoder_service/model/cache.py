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

    def get(self, layer: nn.Module, default=None):
        return self._entries.get(layer, default)

    def put(self, layer: nn.Module, value) -> None:
        self._entries[layer] = value

    def seen(self, layer: nn.Module) -> bool:
        """True from the second chunk on, for layers whose first chunk is special."""
        first = layer not in self._entries
        self._entries[layer] = True
        return not first


def with_causal_context(x: torch.Tensor, layer: nn.Module, cache: CausalCache | None,
                        kernel_t: int, stride_t: int) -> torch.Tensor:
    """Prepend the temporal context a causal window of `kernel_t` frames needs.

    On a clip's first chunk that is kernel_t-1 copies of frame 0 (the official causal padding);
    on later chunks it is the padded input the previous chunk had not consumed yet (the last
    kernel_t-stride_t frames for the chunk lengths the model uses). This one rule makes chunked
    inference equal whole-clip inference for every causal layer.
    """
    context = cache.get(layer) if cache is not None else None
    if context is None:
        context = x[:, :, :1].expand(-1, -1, kernel_t - 1, -1, -1)
    padded = torch.cat([context, x], dim=2) if kernel_t > 1 else x
    if cache is not None:
        consumed = (padded.shape[2] - kernel_t) // stride_t * stride_t + stride_t
        cache.put(layer, padded[:, :, consumed:].clone())  # clone: do not pin the whole chunk
    return padded
