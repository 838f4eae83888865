"""Memory-bound WF-VAE operations behind one seam: a Triton kernel on CUDA, a PyTorch reference elsewhere.

The backend (`use_backend(...)`, or `WFVAE_KERNELS=torch|triton|auto`, default auto) is resolved
once per process; the model calls only the functions exported here.
"""
from kernels.dispatch import (
                              channel_layer_norm,
                              haar2d,
                              haar3d,
                              haar_pyramid,
                              inverse_haar2d,
                              inverse_haar3d,
                              kernel_backend,
                              kernel_report,
                              use_backend,
)

__all__ = ["channel_layer_norm", "haar2d", "haar3d", "haar_pyramid", "inverse_haar2d", "inverse_haar3d",
           "kernel_backend", "kernel_report", "use_backend"]
