"""The Triton implementations the dispatcher can pick (same signatures as the references).

Importing this module imports triton; on CPU set TRITON_INTERPRET=1 before that happens.
"""
from kernels.norm_triton import channel_layer_norm

__all__ = ["channel_layer_norm"]
