"""Writing an output folder (shards/layout.py): data files where the latents are made, commits by the driver.

Encoder actors write each unit's latents as one Parquet file into `_staging/<shard>/` under a
name unique to the attempt (a retried unit never overwrites a file another attempt reported) and
report only a records.DataFile. The driver commits a shard once every unit is in:
  1. the old manifest goes first (from here the shard reads as incomplete),
  2. staged files move to their deterministic names in latents/ (a rename on local disk, a
     server-side copy on object stores: no latent byte passes through the driver),
  3. data files of the shard from an earlier, different layout are deleted,
  4. the ledger file is written, then the manifest, last; then the staging folder goes.
A crash anywhere leaves a shard without a valid manifest: the next run redoes it whole, and its
orphans are never read (plain readers see only latents/, which only ever receives a shard's
complete set of files, and the manifest-following reader sees only what a manifest lists).

Parquet files: zstd, page checksums (verified on read), rows sorted by key, row groups of about
ROW_GROUP_BYTES, statistics on `key` only: the same rows always give the same bytes.
"""
import json
import os
import tempfile
import uuid

import fsspec
import pyarrow.parquet as pq

from encoder_service import records
from encoder_service.records import DataFile, LatentRow, LedgerRow
from encoder_service.shards import layout
from encoder_service.shards.schema import run_metadata
from encoder_service.storage import is_local, join, retry, sha256_of

LOCAL = fsspec.filesystem("file")
ROW_GROUP_BYTES = 64 << 20  # ~64 MiB row groups: large sequential reads, several per file for workers
_DICTIONARY = ["source_url", "bucket", "vae_name", "vae_sha256", "latent_dtype", "precision", "pipeline_version",
               "stage", "reason"]


def write_parquet(fs, path: str, rows: list, cls, run_meta: dict,
                  row_group_bytes: int = ROW_GROUP_BYTES) -> tuple[int, str]:
    """Write rows (sorted by key) as one Parquet file at path; returns (bytes, sha256)."""
    rows = sorted(rows, key=lambda r: (r.key, getattr(r, "stage", ""), getattr(r, "reason", "")))
    table = records.to_table(rows, cls, run_metadata(run_meta))
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    with tempfile.NamedTemporaryFile(suffix=".parquet", delete=False) as tmp:
        local = tmp.name
    try:
        pq.write_table(table, local, compression="zstd", row_group_size=max(1, row_group_bytes // per_row),
                       use_dictionary=[c for c in _DICTIONARY if c in table.column_names],
                       write_statistics=["key"], write_page_checksum=True)
        size, digest = os.path.getsize(local), sha256_of(LOCAL, local)
        put_file(fs, local, path)
    finally:
        if os.path.exists(local):
            os.unlink(local)
    return size, digest


def put_file(fs, local: str, path: str) -> None:
    """Publish a local file at path whole or not at all."""
    if is_local(fs):  # same-filesystem rename is atomic: copy beside the target first
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        staging = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.put_file(local, staging)
        os.replace(staging, path)
    else:  # object stores publish an object only once its upload completes
        retry(lambda: fs.put_file(local, path))


def put_bytes(fs, path: str, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(delete=False) as tmp:
        tmp.write(data)
    try:
        put_file(fs, tmp.name, path)
    finally:
        os.unlink(tmp.name)


class StagingWriter:
    """What an encoder actor writes with: one unit's latents -> one staged data file."""

    def __init__(self, fs, root: str, run_meta: dict, row_group_bytes: int = ROW_GROUP_BYTES):
        self.fs, self.root, self.run_meta, self.row_group_bytes = fs, root.rstrip("/"), run_meta, row_group_bytes

    def write(self, shard_id: str, unit: int, rows: list[LatentRow]) -> DataFile:
        name = f"{layout.staging_dir(shard_id)}/{unit:05d}-{uuid.uuid4().hex}.parquet"
        size, digest = write_parquet(self.fs, join(self.root, name), rows, LatentRow, self.run_meta,
                                     self.row_group_bytes)
        return DataFile(name, len(rows), size, digest)


def commit_shard(fs, root: str, shard_id: str, staged: dict[int, DataFile], ledger: list[LedgerRow],
                 run_meta: dict, manifest: dict) -> dict:
    """Move a shard's staged files into place, write its ledger and then its manifest (see above).
    `manifest` holds the caller's fields (settings, counts, statistics); returns the full manifest."""
    root = root.rstrip("/")
    manifest_path = join(root, layout.manifest_name(shard_id))
    if fs.exists(manifest_path):
        fs.rm(manifest_path)
    files = []
    for unit in sorted(staged):
        entry, final = staged[unit], layout.data_name(shard_id, unit)
        fs.makedirs(join(root, layout.LATENTS), exist_ok=True)
        src, dst = join(root, entry.name), join(root, final)
        retry(lambda src=src, dst=dst: fs.mv(src, dst))
        files.append(DataFile(final, entry.rows, entry.bytes, entry.sha256))
    _remove_stale(fs, root, shard_id, {f.name for f in files})
    errors = layout.errors_name(shard_id)
    size, digest = write_parquet(fs, join(root, errors), ledger, LedgerRow, run_meta)
    full = {**manifest, "shard_id": shard_id, "files": [f.__dict__ for f in files],
            "errors": DataFile(errors, len(ledger), size, digest).__dict__}
    put_bytes(fs, manifest_path, json.dumps(full, indent=1, sort_keys=True).encode())
    remove_staging(fs, root, shard_id)
    return full


def _remove_stale(fs, root: str, shard_id: str, keep: set[str]) -> None:
    for path in fs.glob(join(root, layout.data_prefix(shard_id)) + "*.parquet"):
        if relative(root, path, fs) not in keep:
            fs.rm(path)


def remove_staging(fs, root: str, shard_id: str) -> None:
    path = join(root, layout.staging_dir(shard_id))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def relative(root: str, path: str, fs) -> str:
    """path (as fs lists it) relative to the output root (as the caller spelled it)."""
    base = fs._strip_protocol(root).rstrip("/")
    return fs._strip_protocol(path)[len(base) + 1:]
