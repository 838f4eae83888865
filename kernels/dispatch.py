"""Pick the Triton or the PyTorch implementation of each kernel.

auto: Triton for CUDA tensors when triton imports, the reference otherwise. torch: always the
reference. triton: Triton whatever the device (on CPU this needs TRITON_INTERPRET=1 set before
triton is imported; tests use it to run the kernels without a GPU), an error if triton cannot be
imported. Ops without a Triton kernel yet use their reference in every mode; kernel_report() says
which implementation each op gets.
"""
import os

import torch

from kernels import haar_reference, norm_reference

_CHOICES = ("auto", "torch", "triton")


def kernel_backend() -> str:
    choice = os.environ.get("WFVAE_KERNELS", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"WFVAE_KERNELS={choice!r} is not one of {', '.join(_CHOICES)}")
    return choice


def _use_triton(x: torch.Tensor) -> bool:
    choice = kernel_backend()
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    return x.is_cuda and _triton_available()  # auto: a missing kernel module means the reference


def _triton_available() -> bool:
    try:
        import kernels.triton_ops  # noqa: F401
    except ImportError:
        return False
    return True


def _impl(name: str, x: torch.Tensor, reference_module):
    if _use_triton(x):
        try:
            import kernels.triton_ops as triton_ops
        except ImportError as exc:
            raise RuntimeError(f"WFVAE_KERNELS=triton, but triton cannot be imported ({exc}); "
                               "use WFVAE_KERNELS=torch or auto") from exc
        if name in triton_ops.__all__:
            return getattr(triton_ops, name)
    return getattr(reference_module, name)


def kernel_report(device: str = "cuda") -> dict[str, str]:
    """Which implementation each op gets for tensors on `device` under the current WFVAE_KERNELS."""
    triton_ops = ()
    if kernel_backend() == "triton" or (kernel_backend() == "auto" and device.startswith("cuda")
                                         and _triton_available()):
        import kernels.triton_ops as module
        triton_ops = module.__all__
    return {name: "triton" if name in triton_ops else "torch" for name in _OPS}


_OPS = ("haar3d", "haar2d", "inverse_haar3d", "inverse_haar2d", "haar_pyramid", "channel_layer_norm")


def haar3d(x, causal_pad=True):
    return _impl("haar3d", x, haar_reference)(x, causal_pad)


def haar2d(x):
    return _impl("haar2d", x, haar_reference)(x)


def inverse_haar3d(x, drop_first=True, add_low=None):
    return _impl("inverse_haar3d", x, haar_reference)(x, drop_first, add_low)


def inverse_haar2d(x, add_low=None):
    return _impl("inverse_haar2d", x, haar_reference)(x, add_low)


def haar_pyramid(x, causal_pad=True, dtype=None):
    return _impl("haar_pyramid", x, haar_reference)(x, causal_pad, dtype)


def channel_layer_norm(x, weight, bias, eps=1e-6, silu=False):
    return _impl("channel_layer_norm", x, norm_reference)(x, weight, bias, eps, silu)
