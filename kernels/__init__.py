"""Memory-bound WF-VAE operations behind one seam: a Triton kernel on CUDA, a PyTorch reference elsewhere.

`WFVAE_KERNELS=torch|triton|auto` (default auto) picks the implementation; the model calls only
the functions exported here.
"""
from kernels.dispatch import (channel_layer_norm, haar2d, haar3d, haar_pyramid, inverse_haar2d,
                              inverse_haar3d, kernel_backend, kernel_report)

__all__ = ["channel_layer_norm", "haar2d", "haar3d", "haar_pyramid", "inverse_haar2d", "inverse_haar3d",
           "kernel_backend", "kernel_report"]
