"""Every option vocabulary, defined and parsed once: the job, the CLI, the reader and the benchmarks
all use these. A parser returns the typed value or raises OptionError, which argparse prints as a
usage error (exit 2, one line) and everything else sees as a ValueError. Importing it imports no
torch (ingest workers and the reader's planning parse options too): dtypes are named here and made
torch dtypes only where a tensor needs one."""
import argparse
import importlib
from dataclasses import dataclass

MAX_FRAMES = 1025       # frames per clip
MAX_SIDE = 8192         # pixels per clip side


class OptionError(argparse.ArgumentTypeError, ValueError):
    pass


def _ints(text: str, n: int, what: str, example: str) -> tuple[int, ...]:
    parts = str(text).lower().split("x")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != n:
        raise OptionError(f"{what} must look like {example}, got {text!r}")
    return values


def frames(text) -> int:
    """Frames per clip: 4k+1 (1, 5, ..., 33, ...), the lengths WF-VAE's causal encoder takes."""
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise OptionError(f"frames per clip must be a number 4k+1 (e.g. 33), got {text!r}") from None
    if not 1 <= n <= MAX_FRAMES or (n - 1) % 4:
        lo = max(1, (n - 1) // 4 * 4 + 1)
        raise OptionError(f"frames per clip must be 4k+1 between 1 and {MAX_FRAMES} (1, 5, 9, ..., 33), "
                          f"got {n}; try {lo} or {lo + 4}")
    return n


def _side(v: int, text) -> int:
    if not 8 <= v <= MAX_SIDE or v % 8:
        fix = min(MAX_SIDE, max(8, v // 8 * 8))
        raise OptionError(f"{text}: height and width must be multiples of 8 between 8 and {MAX_SIDE} "
                          f"(the VAE downsamples 8x); try {fix}")
    return v


def size(text) -> tuple[int, int]:
    """Clip size "HxW" (after resize + centre crop)."""
    h, w = _ints(text, 2, "size", "256x256 (HxW)")
    return _side(h, text), _side(w, text)


def bucket(text) -> tuple[int, int, int]:
    """Aspect-ratio bucket "TxHxW"."""
    t, h, w = _ints(text, 3, "bucket", "33x480x848 (TxHxW)")
    return frames(t), _side(h, text), _side(w, text)


def format_dims(dims) -> str:
    return "x".join(str(v) for v in dims)


@dataclass(frozen=True)
class ClipMode:
    """Which clips of a video: first | all (non-overlapping from the start) | uniform:N | random:N |
    spans (one clip per time span listed in the sample's JSON)."""
    kind: str
    count: int | None = None

    def __str__(self) -> str:
        return self.kind if self.count is None else f"{self.kind}:{self.count}"


def clip_mode(text) -> ClipMode:
    if isinstance(text, ClipMode):
        return text
    kind, _, count = str(text).partition(":")
    if kind in ("first", "all", "spans") and not count:
        return ClipMode(kind)
    if kind in ("uniform", "random") and count.isdigit() and int(count) >= 1:
        return ClipMode(kind, int(count))
    raise OptionError(f"clips per video must be first, all, uniform:N, random:N (N >= 1) or spans, got {text!r}")


def _torch_dtype(name: str):
    return getattr(importlib.import_module("torch"), name)


@dataclass(frozen=True)
class Precision:
    """A precision policy: the dtype the encoder computes in, the dtype latents are stored in (torch
    names), whether float32 matmuls/convolutions may use TF32, and the label stored with every latent."""
    name: str
    compute_name: str
    storage_name: str
    tf32: bool
    label: str

    @property
    def compute(self):
        return _torch_dtype(self.compute_name)

    @property
    def storage(self):
        return _torch_dtype(self.storage_name)

    @property
    def storage_bytes(self) -> int:
        return STORAGE_BYTES[self.storage_name]


PRECISIONS = {p.name: p for p in (
    Precision("bf16", "bfloat16", "bfloat16", False, "bf16-weights-activations_fp32-norm-stats"),
    Precision("fp32", "float32", "float32", False, "fp32"),  # TF32 off: fp32 means fp32
    Precision("tf32", "float32", "float32", True, "fp32-storage_tf32-matmul-conv"),
)}


def precision(text) -> Precision:
    if isinstance(text, Precision):
        return text
    if text not in PRECISIONS:
        raise OptionError(f"precision must be one of {', '.join(PRECISIONS)}, got {text!r}")
    return PRECISIONS[text]


# model/compute dtypes by option spelling (the CLI's and benchmarks' --dtype), as torch names them
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
# latents are stored in one of these, named as torch names them, with their sizes in bytes
STORAGE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def dtype(text):
    """The torch dtype an option names (torch is imported here, by whoever asks for a dtype)."""
    if text not in DTYPES:
        raise OptionError(f"dtype must be one of {', '.join(DTYPES)}, got {text!r}")
    return _torch_dtype(DTYPES[text])


def dtype_name(value) -> str:
    """The stored spelling of a latent dtype: "bfloat16", "float16" or "float32"."""
    name = str(value).removeprefix("torch.")
    if name not in STORAGE_BYTES:
        raise ValueError(f"latents must be bfloat16, float16 or float32, got {value}")
    return name


def stored_dtype(name: str):
    if name not in STORAGE_BYTES:
        raise ValueError(f"unknown latent_dtype {name!r} (known: {', '.join(STORAGE_BYTES)})")
    return _torch_dtype(name)


DEVICES = ("auto", "cuda", "cpu")
DECODERS = ("decord", "pyav")
VERIFY = ("none", "size", "checksum")  # how committed files are re-checked: not, by size and row count, by hash
INPUT_IDENTITY = ("store", "sha256")  # how a changed input is told: the store's size+ETag/mtime, or also its hash


def choice(options: tuple[str, ...], what: str):
    """A parser accepting one of `options`."""
    def parse(text):
        if text not in options:
            raise OptionError(f"{what} must be one of {', '.join(options)}, got {text!r}")
        return text
    parse.__name__ = what
    return parse


def label(text) -> tuple[str, str]:
    """A Ray node label requirement "key=value"."""
    key, sep, value = str(text).partition("=")
    if not sep or not key or not value:
        raise OptionError(f"a node label must look like key=value, got {text!r}")
    return key, value


def chunk_frames(text) -> int | str | None:
    """Frames per causal-cache chunk: a multiple of 4, "auto" (from free GPU memory) or "none"."""
    if text in (None, "none"):
        return None
    if text == "auto":
        return "auto"
    try:
        n = int(text)
    except (TypeError, ValueError):
        n = -1
    if n < 4 or n % 4:
        raise OptionError(f"chunk frames must be a positive multiple of 4, auto or none, got {text!r}")
    return n
