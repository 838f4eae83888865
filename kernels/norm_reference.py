"""LayerNorm over the channel axis of (B, C, ...) tensors, optionally fused with SiLU (reference)."""
import torch
import torch.nn.functional as F


def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
                       silu: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise every (batch, frame, row, column) position over its C channels, then SiLU if asked.

    bf16/fp16 inputs get float32 statistics; the result has the input's dtype. The result is a
    channels-last view (as in the official code), which convolutions consume without a copy.
    With `out` (a tensor of x's shape, any strides) the result is written there and returned.
    """
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    y = F.layer_norm(x.movedim(1, -1).to(compute), (x.shape[1],), weight.to(compute), bias.to(compute), eps)
    if silu:
        y = F.silu(y)
    y = y.to(x.dtype).movedim(-1, 1)
    return y if out is None else out.copy_(y)
