"""The Triton implementations the dispatcher can pick (same signatures as the references).

Importing this module imports triton; on CPU set TRITON_INTERPRET=1 before that happens.
haar3d and haar2d alone have no kernel: the encoder uses the fused haar_pyramid.
"""
from kernels.haar_triton import haar_pyramid, inverse_haar2d, inverse_haar3d
from kernels.norm_triton import channel_layer_norm

__all__ = ["channel_layer_norm", "haar_pyramid", "inverse_haar2d", "inverse_haar3d"]
