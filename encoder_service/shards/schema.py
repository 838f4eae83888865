"""The latent record as a versioned Arrow schema, and exact tensor <-> bytes encoding.

Arrow has no bfloat16, so tensors are stored as raw little-endian bytes with `latent_shape`
(C, t, h, w) and `latent_dtype` columns; a reader that ignores `latent_dtype` is a bug.
"""
import sys

import numpy as np
import pyarrow as pa
import torch

SCHEMA_VERSION = "1"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_RAW = {"bfloat16": "<u2", "float16": "<f2", "float32": "<f4"}  # bf16 travels as its 16-bit pattern

LATENT_SCHEMA = pa.schema([
    ("key", pa.string()),                     # {shard_id}/{sample_key}/{clip_index}
    ("source_url", pa.string()),
    ("source_key", pa.string()),
    ("clip_index", pa.int32()),
    ("frame_indices", pa.list_(pa.int32())),
    ("src_fps", pa.float32()),
    ("clip_fps", pa.float32()),
    ("src_hw", pa.list_(pa.int32())),
    ("crop_box", pa.list_(pa.int32())),       # top, left, height, width in the resized frame
    ("bucket", pa.string()),                  # TxHxW
    ("metadata", pa.string()),                # pass-through sample metadata (caption, json) as JSON
    ("mean", pa.binary()),
    ("logvar", pa.binary()),                  # null when the run stores no logvar
    ("latent_shape", pa.list_(pa.int32())),   # C, t, h, w
    ("latent_dtype", pa.string()),
    ("vae_name", pa.string()),
    ("vae_sha256", pa.string()),
    ("scale", pa.list_(pa.float32())),
    ("shift", pa.list_(pa.float32())),
    ("precision", pa.string()),
    ("pipeline_version", pa.string()),
])

ERROR_SCHEMA = pa.schema([
    ("key", pa.string()),          # sample key (or clip key) that failed
    ("source_url", pa.string()),
    ("stage", pa.string()),        # read / probe / decode / sample / encode / write
    ("reason", pa.string()),       # short machine-groupable reason, e.g. "too_short"
    ("message", pa.string()),      # the human sentence: what and what to do
])


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"latents must be bfloat16, float16 or float32, got {dtype}")


def encode_tensor(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a CPU tensor (bf16 as its bit pattern)."""
    name = dtype_name(t.dtype)
    t = t.detach().cpu().contiguous()
    array = t.view(torch.int16).numpy().view(np.uint16) if name == "bfloat16" else t.numpy()
    return array.astype(_RAW[name], copy=False).tobytes()


def decode_tensor(data: bytes, shape, dtype: str) -> torch.Tensor:
    """Inverse of encode_tensor: the exact tensor, in its stored dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown latent_dtype {dtype!r} (known: {', '.join(DTYPES)})")
    array = np.frombuffer(data, dtype=_RAW[dtype])
    if sys.byteorder != "little":
        array = array.byteswap().view(array.dtype.newbyteorder())
    array = array.astype(array.dtype.newbyteorder("="), copy=True).reshape(tuple(shape))
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def run_metadata(meta: dict[str, str]) -> dict[bytes, bytes]:
    """Parquet key-value metadata: run-level fields, prefixed so they never clash with Arrow's."""
    return {f"wfvae.{k}".encode(): str(v).encode() for k, v in {"schema_version": SCHEMA_VERSION, **meta}.items()}


def read_run_metadata(schema: pa.Schema) -> dict[str, str]:
    raw = schema.metadata or {}
    return {k.decode()[len("wfvae."):]: v.decode() for k, v in raw.items() if k.startswith(b"wfvae.")}
