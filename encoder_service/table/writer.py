"""Writing files into an output folder (a table.folder.OutputFolder: its filesystem, root and
layout.py's names): latent data files where the latents are made, small bookkeeping files whole.
Which files the table holds is decided by the driver's commits (table/folder.py), never by what a
directory lists.

Encoder actors write each unit's latents as one Parquet file straight to its final name in latents/
(named by its content hash: the same rows give the same name, so a retried or redone unit writes the
same file again) and report only a records.DataFile. A file that no commit adds stays invisible to
every reader of the table, and `vacuum` removes it after the retention.

Parquet files: zstd, page checksums (verified on read), rows sorted by key, row groups of about
ROW_GROUP_BYTES, statistics on `key` only: the same rows always give the same bytes.
"""
import os
import tempfile
import uuid

import fsspec
import pyarrow.parquet as pq

from encoder_service import records
from encoder_service.records import DataFile, LatentRow, RunMeta
from encoder_service.storage import is_local, is_s3, retry, sha256_of
from encoder_service.table import layout
from encoder_service.table.schema import run_metadata

LOCAL = fsspec.filesystem("file")
ROW_GROUP_BYTES = 64 << 20  # ~64 MiB row groups: large sequential reads, several per file for workers
_DICTIONARY = ["source_url", "bucket", "vae_name", "vae_sha256", "latent_dtype", "precision", "pipeline_version",
               "stage", "reason"]


def write_parquet(folder, rows: list, cls, run_meta: RunMeta, name_of,
                  row_group_bytes: int = ROW_GROUP_BYTES) -> DataFile:
    """Write rows (sorted here by key) as one Parquet file, whole or not at all, at the name
    `name_of(sha256)` gives inside the folder. Locally the file is written in the folder's _tmp/ and
    renamed into place."""
    rows = sorted(rows, key=lambda r: (r.key, getattr(r, "stage", ""), getattr(r, "reason", "")))
    table = records.to_table(rows, cls, run_metadata(run_meta))
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    local = _temporary(folder, ".parquet")
    try:
        pq.write_table(table, local, compression="zstd", row_group_size=max(1, row_group_bytes // per_row),
                       use_dictionary=[c for c in _DICTIONARY if c in table.column_names],
                       write_statistics=["key"], write_page_checksum=True)
        size, digest = os.path.getsize(local), sha256_of(LOCAL, local)
        name = name_of(digest)
        _publish(folder.fs, local, folder.path(name))
    finally:
        if os.path.exists(local):
            os.unlink(local)
    keys = (rows[0].key, rows[-1].key, getattr(rows[0], "bucket", "")) if rows else ("", "", "")
    return DataFile(name, len(rows), size, digest, *keys)


def write_table_file(folder, path: str, table) -> int:
    """A bookkeeping table (rows of the shards table) as one Parquet file, whole or not at all;
    returns its size."""
    local = _temporary(folder, ".parquet")
    try:
        pq.write_table(table, local, compression="zstd")
        size = os.path.getsize(local)
        _publish(folder.fs, local, path)
    finally:
        if os.path.exists(local):
            os.unlink(local)
    return size


def put_small(folder, path: str, data: bytes) -> None:
    """Publish a small file (JSON bookkeeping) whole: on local disk written beside its place under a
    dot name and renamed (readers of the folder never see half a file, and no temporary folder is
    left), elsewhere put in one request."""
    fs = folder.fs
    if is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        retry(lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data))
        fs.invalidate_cache(path)
        return
    if not is_local(fs):
        retry(lambda: fs.pipe_file(path, data))
        return
    target = fs._strip_protocol(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    local = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(local, "wb") as f:
            f.write(data)
        os.replace(local, target)
    finally:
        if os.path.exists(local):
            os.unlink(local)


def _temporary(folder, suffix: str) -> str:
    """A local file name to write into: inside the output folder for local folders (so publishing
    is a rename, and a crash leaves it where the next run's cleanup looks), else the system's."""
    if is_local(folder.fs):
        tmp = folder.fs._strip_protocol(folder.path(layout.LOCAL_TMP))
        os.makedirs(tmp, exist_ok=True)
        return os.path.join(tmp, f"{uuid.uuid4().hex}{suffix}")
    fd, name = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    return name


def _publish(fs, local: str, path: str) -> None:
    if is_local(fs):  # same-filesystem rename is atomic
        target = fs._strip_protocol(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(local, target)
    else:  # object stores publish an object only once its upload completes
        retry(lambda: fs.put_file(local, path))


class UnitWriter:
    """What an encoder actor writes with: one unit's latents -> one data file at its final name in
    `folder` (a table.folder.OutputFolder: its filesystem, root and layout)."""

    def __init__(self, folder, run_meta: RunMeta, row_group_bytes: int = ROW_GROUP_BYTES):
        self.folder, self.run_meta, self.row_group_bytes = folder, run_meta, row_group_bytes

    def write(self, shard_id: str, unit: int, rows: list[LatentRow]) -> DataFile:
        return write_parquet(self.folder, rows, LatentRow, self.run_meta,
                             lambda digest: layout.data_name(shard_id, unit, digest), self.row_group_bytes)
