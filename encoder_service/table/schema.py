"""Latent tensors as exact bytes, and the run-level Parquet key-value metadata.

Arrow has no bfloat16, so tensors are stored as raw little-endian bytes with `latent_shape`
(C, t, h, w) and `latent_dtype` columns (records.LatentRow); a reader that ignores `latent_dtype`
is a bug. The row schema itself is derived from records.LatentRow. torch is imported by the
functions that make or take tensors, not by this module (the writer's bookkeeping imports it).
"""
import dataclasses
import json
import sys

import numpy as np

from encoder_service.options import dtype_name, stored_dtype
from encoder_service.records import RunMeta

# 2: latents/, errors/, _manifests/ layout; several data files per shard
# 3: typed manifests (records.Manifest) with the input's identity; the folder index _index/; the lease
# 4: the folder is a Delta Lake table (table/folder.py); data files named by their content's hash
SCHEMA_VERSION = "4"
RAW_DTYPES = {"bfloat16": "<u2", "float16": "<f2", "float32": "<f4"}  # bf16 travels as its 16-bit pattern


def encode_tensor(t) -> bytes:
    """Raw little-endian bytes of a CPU tensor (bf16 as its bit pattern)."""
    import torch
    name = dtype_name(t.dtype)
    t = t.detach().cpu().contiguous()
    array = t.view(torch.int16).numpy().view(np.uint16) if name == "bfloat16" else t.numpy()
    return array.astype(RAW_DTYPES[name], copy=False).tobytes()


def decode_tensor(data: bytes, shape, dtype: str):
    """Inverse of encode_tensor: the exact tensor, in its stored dtype."""
    import torch
    stored_dtype(dtype)  # refuses unknown names
    array = np.frombuffer(data, dtype=RAW_DTYPES[dtype])
    if sys.byteorder != "little":
        array = array.byteswap().view(array.dtype.newbyteorder())
    array = array.astype(array.dtype.newbyteorder("="), copy=True).reshape(tuple(shape))
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def run_metadata(meta: RunMeta) -> dict[bytes, bytes]:
    """Parquet key-value metadata: run-level fields, prefixed so they never clash with Arrow's
    (lists as JSON)."""
    fields = {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(meta)}
    return {f"wfvae.{k}".encode(): (json.dumps(v) if isinstance(v, list) else str(v)).encode()
            for k, v in fields.items()}


def read_run_metadata(schema) -> dict[str, str]:
    raw = schema.metadata or {}
    return {k.decode()[len("wfvae."):]: v.decode() for k, v in raw.items() if k.startswith(b"wfvae.")}
