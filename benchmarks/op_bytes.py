"""Device-independent accounting of what a forward pass writes: ops and bytes by class, and the
layout every convolution receives. A `TorchDispatchMode`, so it sees the aten ops a CUDA run
would launch (the same graph on any device); Triton kernels (run by the interpreter off CUDA) are
counted as one op writing their outputs, the interpreter's own host copies excluded.

Convolution outputs are given the layout cuDNN would give them (CPU kernels sometimes return
standard layout where cuDNN keeps channels-last), so the layouts downstream are the GPU's.

Classes: conv (aten.convolution), movement (cat, pad, copy, clone, stack, dtype casts, fills:
bytes that only move data), elementwise (add, mul, ... SiLU), norm (LayerNorm or GroupNorm,
ours in Triton or aten), attention, other. Views write nothing.
"""
import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MOVEMENT = {"cat", "constant_pad_nd", "copy_", "copy", "clone", "_to_copy", "stack", "fill_", "zero_",
            "new_zeros", "zeros", "zeros_like", "full", "repeat", "index", "index_put_", "slice_scatter",
            "replication_pad3d", "reflection_pad3d", "contiguous", "upsample_nearest3d",
            "expand_copy"}
ELEMENTWISE = {"add", "add_", "sub", "mul", "mul_", "div", "silu", "sigmoid", "exp", "clamp", "where", "neg",
               "rsub", "tanh", "pow", "sqrt", "rsqrt", "addcmul"}
NORM = {"native_layer_norm", "native_group_norm", "layer_norm"}
ATTENTION = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention", "bmm", "_softmax",
             "baddbmm", "scaled_dot_product_attention"}
# write nothing: a view returning its input's storage (reshape after a copy it made, counted then)
# and allocations (what is later written into them is counted by the op that writes)
NO_WRITE = {"_unsafe_view", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
CLASSES = ("conv", "movement", "elementwise", "norm", "attention", "kernel", "other")


def op_class(name: str) -> str:
    base = name.split(".")[0]
    if base == "convolution":
        return "conv"
    for cls, names in (("movement", MOVEMENT), ("elementwise", ELEMENTWISE), ("norm", NORM),
                       ("attention", ATTENTION)):
        if base in names:
            return cls
    return "other"


def memory_format(t: torch.Tensor) -> str:
    """'channels_last' / 'contiguous' / 'both' (size-1 dims make both true) / 'strided'."""
    if t.ndim not in (4, 5):
        return "contiguous" if t.is_contiguous() else "strided"
    cl = torch.channels_last_3d if t.ndim == 5 else torch.channels_last
    last, std = t.is_contiguous(memory_format=cl), t.is_contiguous()
    return "both" if last and std else "channels_last" if last else "contiguous" if std else "strided"


def run_format(fx: str, fw: str) -> str:
    """The format cuDNN runs a convolution in (cudnn_conv_suggest_memory_format): channels-last
    when the input or the weight is, standard otherwise."""
    return "channels_last" if "channels_last" in (fx, fw) else "contiguous"


def converted(fx: str, fw: str) -> tuple[bool, bool]:
    """Whether cuDNN would re-layout the input, and the weight: each operand not already in the
    format the convolution runs in is copied into it."""
    wanted = run_format(fx, fw)
    return fx not in (wanted, "both"), fw not in (wanted, "both")


@dataclass
class Account:
    ops: Counter = field(default_factory=Counter)      # class -> ops
    bytes: Counter = field(default_factory=Counter)    # class -> bytes written
    by_op: Counter = field(default_factory=Counter)    # aten op -> bytes written
    convs: list = field(default_factory=list)          # per conv: (input format, weight format)

    @property
    def conv_input_conversions(self) -> int:
        """Convolutions whose (large) input is not in the format the conv runs in."""
        return sum(converted(fx, fw)[0] for fx, fw in self.convs)

    def movement_ratio(self) -> float:
        return self.bytes["movement"] / max(1, self.bytes["conv"])

    def summary(self) -> dict:
        return {"ops": dict(self.ops), "bytes": dict(self.bytes), "convolutions": len(self.convs),
                "conv_input_conversions": self.conv_input_conversions,
                "conv_weight_conversions": sum(converted(fx, fw)[1] for fx, fw in self.convs),
                "movement_over_conv_bytes": round(self.movement_ratio(), 4),
                "top_movement_ops": {k: v for k, v in self.by_op.most_common()
                                     if op_class(k) == "movement"}}


def cudnn_output_layout(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The conv output in the layout cuDNN gives it (channels-last when the input or the weight is:
    cudnn_conv_suggest_memory_format), which CPU kernels do not always do; not counted (a layout
    the GPU would produce directly)."""
    if out.ndim == 5 and run_format(memory_format(x), memory_format(weight)) == "channels_last":
        return out.contiguous(memory_format=torch.channels_last_3d)
    return out


class OpBytes(TorchDispatchMode):
    """with OpBytes() as acc: model(x); acc.account.summary()."""

    def __init__(self):
        super().__init__()
        self.account, self.paused = Account(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self._count(func, args, out)
            if op_class(func.__name__) == "conv":
                out = cudnn_output_layout(args[0], args[1], out)
        return out

    def _count(self, func, args, out):
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        cls = op_class(name)
        no_write = func.is_view or name.split(".")[0] in NO_WRITE
        written = 0 if no_write else sum(t.numel() * t.element_size() for t in _tensors(out))
        self.account.ops[cls] += 1
        self.account.bytes[cls] += written
        self.account.by_op[name] += written
        if cls == "conv":
            self.account.convs.append((memory_format(args[0]), memory_format(args[1])))

    def kernel(self, outputs) -> None:
        """Count one Triton kernel launch writing `outputs`."""
        self.account.ops["kernel"] += 1
        self.account.bytes["kernel"] += sum(t.numel() * t.element_size() for t in _tensors(outputs))


def _tensors(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def counting_triton_kernels(mode: OpBytes):
    """Count each Triton op of kernels.triton_ops as one kernel writing its result (the interpreter's
    own copies to and from the host are not counted)."""
    import kernels.triton_ops as ops
    saved = {name: getattr(ops, name) for name in ops.__all__}

    def wrap(fn):
        def counted(*args, **kwargs):
            mode.paused += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                mode.paused -= 1
            written = kwargs.get("out") if kwargs.get("out") is not None else out
            mode.kernel(written)
            return out
        return counted

    for name, fn in saved.items():
        setattr(ops, name, wrap(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)
