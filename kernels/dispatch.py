"""Pick the Triton or the PyTorch implementation of each kernel.

The backend is resolved once per process: `use_backend(name)`, or else `WFVAE_KERNELS` read at the
first kernel call (default auto).
* auto: Triton for CUDA tensors when triton imports, the reference otherwise.
* torch: always the reference.
* triton: Triton whatever the device (on CPU this needs TRITON_INTERPRET=1 set before triton is
  imported; tests use it to run the kernels without a GPU), an error if triton cannot be imported.
float64 tensors always get the reference (the kernels compute in float32), and ops without a
Triton kernel use their reference in every mode; kernel_report() says which op gets which.
"""
import functools
import os

import torch

from kernels import haar_reference, norm_reference

CHOICES = ("auto", "torch", "triton")
OPS = ("haar3d", "haar2d", "inverse_haar3d", "inverse_haar2d", "haar_pyramid", "channel_layer_norm")
_REFERENCES = {"channel_layer_norm": norm_reference}
_backend: str | None = None


def use_backend(name: str) -> None:
    """Choose the backend for this process (instead of WFVAE_KERNELS)."""
    global _backend
    if name not in CHOICES:
        raise ValueError(f"kernel backend {name!r} is not one of {', '.join(CHOICES)}")
    _backend = name


def kernel_backend() -> str:
    if _backend is None:
        choice = os.environ.get("WFVAE_KERNELS", "auto").lower()
        if choice not in CHOICES:
            raise ValueError(f"WFVAE_KERNELS={choice!r} is not one of {', '.join(CHOICES)}")
        use_backend(choice)
    return _backend


@functools.cache
def _triton_ops():
    """The Triton module, or None if triton cannot be imported (an error when triton was asked for)."""
    try:
        import kernels.triton_ops as module
    except ImportError as exc:
        if kernel_backend() == "triton":
            raise RuntimeError(f"WFVAE_KERNELS=triton, but triton cannot be imported ({exc}); "
                               "use WFVAE_KERNELS=torch or auto") from exc
        return None
    return module


def _implementation(name: str, device_type: str, dtype: torch.dtype):
    choice = kernel_backend()
    wants_triton = choice == "triton" or (choice == "auto" and device_type == "cuda")
    if wants_triton and dtype != torch.float64:
        module = _triton_ops()
        if module is not None and name in module.__all__:
            return getattr(module, name)
    return getattr(_REFERENCES.get(name, haar_reference), name)


def kernel_report(device: str = "cuda", dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Which implementation each op gets for tensors on `device` of `dtype` under this backend."""
    device_type = torch.device(device).type
    return {name: "triton" if _implementation(name, device_type, dtype).__module__.endswith("_triton")
            else "torch" for name in OPS}


def _impl(name: str, x: torch.Tensor):
    return _implementation(name, x.device.type, x.dtype)


def haar3d(x, causal_pad=True):
    return _impl("haar3d", x)(x, causal_pad)


def haar2d(x):
    return _impl("haar2d", x)(x)


def inverse_haar3d(x, drop_first=True, add_low=None):
    return _impl("inverse_haar3d", x)(x, drop_first, add_low)


def inverse_haar2d(x, add_low=None):
    return _impl("inverse_haar2d", x)(x, add_low)


def haar_pyramid(x, causal_pad=True, dtype=None, memory_format=torch.contiguous_format):
    # a uint8 input is computed in `dtype`: that decides between the kernel and the reference
    return _implementation("haar_pyramid", x.device.type, dtype or x.dtype)(x, causal_pad, dtype, memory_format)


def channel_layer_norm(x, weight, bias, eps=1e-6, silu=False, out=None):
    return _impl("channel_layer_norm", x)(x, weight, bias, eps, silu, out)
