"""Writing an output folder (shards/layout.py): data files where the latents are made, commits by the driver.

Encoder actors write each unit's latents as one Parquet file into `_staging/<shard>/` under a
name unique to the attempt (a retried unit never overwrites a file another attempt reported) and
report only a records.DataFile. The driver commits a shard once every unit is in:
  1. the commit's intent goes into the shard's staging folder: every name in latents/ and errors/
     the commit may write or must delete (the new files, and the old manifest's),
  2. the old manifest goes (from here the shard reads as incomplete),
  3. staged files move to their deterministic names in latents/ (a rename on local disk, a
     server-side copy on object stores: no latent byte passes through the driver),
  4. the old manifest's files that the new one does not list are deleted,
  5. the ledger file is written, then the manifest, last; then the staging folder goes (intent too).
A crash anywhere leaves a shard without a manifest, or with its new one: the next run finds the
intent, and where the shard has no manifest it deletes the files the intent names, so plain readers
see only committed shards; no listing of latents/ is ever needed. A commit lists nothing: it costs
about one request per file plus four on S3, whatever the folder holds.

Parquet files: zstd, page checksums (verified on read), rows sorted by key, row groups of about
ROW_GROUP_BYTES, statistics on `key` only: the same rows always give the same bytes.
"""
import dataclasses
import json
import os
import tempfile
import uuid

import fsspec
import pyarrow.parquet as pq

from encoder_service import records
from encoder_service.records import DataFile, LatentRow, LedgerRow, Manifest, RunMeta
from encoder_service.shards import layout
from encoder_service.shards.manifest import ManifestUnreadable, read_manifest
from encoder_service.shards.schema import SCHEMA_VERSION, run_metadata
from encoder_service.storage import is_local, is_s3, join, retry, server_copy, sha256_of

LOCAL = fsspec.filesystem("file")
ROW_GROUP_BYTES = 64 << 20  # ~64 MiB row groups: large sequential reads, several per file for workers
_DICTIONARY = ["source_url", "bucket", "vae_name", "vae_sha256", "latent_dtype", "precision", "pipeline_version",
               "stage", "reason"]


def write_parquet(fs, root: str, path: str, rows: list, cls, run_meta: RunMeta,
                  row_group_bytes: int = ROW_GROUP_BYTES) -> tuple[int, str]:
    """Write rows (sorted by key) as one Parquet file at path, whole or not at all; returns (bytes,
    sha256). Locally the file is written in the folder's _staging/ and renamed into place."""
    rows = sorted(rows, key=lambda r: (r.key, getattr(r, "stage", ""), getattr(r, "reason", "")))
    table = records.to_table(rows, cls, run_metadata(run_meta))
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    local = _temporary(fs, root, ".parquet")
    try:
        pq.write_table(table, local, compression="zstd", row_group_size=max(1, row_group_bytes // per_row),
                       use_dictionary=[c for c in _DICTIONARY if c in table.column_names],
                       write_statistics=["key"], write_page_checksum=True)
        size, digest = os.path.getsize(local), sha256_of(LOCAL, local)
        _publish(fs, local, path)
    finally:
        if os.path.exists(local):
            os.unlink(local)
    return size, digest


def publish_table(fs, root: str, path: str, table) -> None:
    """A bookkeeping table (the folder index) as one Parquet file, whole or not at all."""
    local = _temporary(fs, root, ".parquet")
    try:
        pq.write_table(table, local, compression="zstd")
        _publish(fs, local, path)
    finally:
        if os.path.exists(local):
            os.unlink(local)


def put_small(fs, root: str, path: str, data: bytes) -> str:
    """Publish a small file (JSON bookkeeping) whole; returns the tag a listing will show for it
    (shards/index.py compares them): the ETag on S3, the mtime in ns locally."""
    if is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        reply = retry(lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data))
        fs.invalidate_cache(path)
        return reply["ETag"].strip('"')
    local = _temporary(fs, root, ".json")
    with open(local, "wb") as f:
        f.write(data)
    _publish(fs, local, path)
    if is_local(fs):
        return str(os.stat(fs._strip_protocol(path)).st_mtime_ns)
    info = fs.info(path)
    return str(info.get("ETag") or info.get("mtime") or info.get("size"))


def _temporary(fs, root: str, suffix: str) -> str:
    """A local file name to write into: inside the output folder for local folders (so publishing
    is a rename, and a crash leaves it where the next run's cleanup looks), else the system's."""
    if is_local(fs):
        folder = fs._strip_protocol(join(root, layout.STAGING))
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, f"{layout.LOCAL_TMP_PREFIX}{uuid.uuid4().hex}{suffix}")
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


class StagingWriter:
    """What an encoder actor writes with: one unit's latents -> one staged data file."""

    def __init__(self, fs, root: str, run_meta: RunMeta, row_group_bytes: int = ROW_GROUP_BYTES):
        self.fs, self.root, self.run_meta, self.row_group_bytes = fs, root.rstrip("/"), run_meta, row_group_bytes

    def write(self, shard_id: str, unit: int, rows: list[LatentRow]) -> DataFile:
        name = f"{layout.staging_dir(shard_id)}/{unit:05d}-{uuid.uuid4().hex}.parquet"
        size, digest = write_parquet(self.fs, self.root, join(self.root, name), rows, LatentRow, self.run_meta,
                                     self.row_group_bytes)
        return DataFile(name, len(rows), size, digest)


@dataclasses.dataclass(frozen=True)
class Committed:
    manifest: Manifest
    manifest_bytes: int
    manifest_tag: str


def commit_shard(fs, root: str, manifest: Manifest, staged: dict[int, DataFile], ledger: list[LedgerRow],
                 replaces: bool = True, guard=None) -> Committed:
    """Move a shard's staged files into place, write its ledger and then its manifest (see above).
    `manifest` holds everything but the files; `replaces`: the shard may have a manifest already
    (its files are replaced; False skips looking for one: a shard the folder never held);
    `guard()` is called just before the manifest is written and may raise to stop the commit."""
    root, shard_id = root.rstrip("/"), manifest.shard_id
    old = _old_files(fs, root, shard_id) if replaces else []
    finals = {unit: layout.data_name(shard_id, unit) for unit in sorted(staged)}
    errors = layout.errors_name(shard_id)
    intent = {"shard_id": shard_id, "files": sorted({*finals.values(), errors, *old})}
    put_small(fs, root, join(root, layout.staging_dir(shard_id), layout.COMMIT_INTENT), json.dumps(intent).encode())
    if old:
        fs.rm(join(root, layout.manifest_name(shard_id)))
    _move(fs, root, {staged[u].name: finals[u] for u in finals})
    stale = sorted(set(old) - {*finals.values(), errors})
    if stale:
        fs.rm([join(root, name) for name in stale])
    size, digest = write_parquet(fs, root, join(root, errors), ledger, LedgerRow, manifest.run)
    full = dataclasses.replace(manifest, schema_version=SCHEMA_VERSION,
                               files=[dataclasses.replace(staged[u], name=finals[u]) for u in finals],
                               errors=DataFile(errors, len(ledger), size, digest))
    data = records.to_json(full)
    if guard is not None:
        guard()
    tag = put_small(fs, root, join(root, layout.manifest_name(shard_id)), data)
    _remove_staged(fs, root, shard_id, [f.name for f in staged.values()])
    return Committed(full, len(data), tag)


def _old_files(fs, root: str, shard_id: str) -> list[str]:
    """The files the shard's current manifest lists (none without one): what a recommit replaces."""
    try:
        old = read_manifest(fs, root, shard_id)
    except ManifestUnreadable:
        return []
    return [f.name for f in [*old.files, old.errors]] if old else []


def _move(fs, root: str, moves: dict[str, str]) -> None:
    """Staged files to their final names: renames locally; on object stores server-side copies (the
    staged sources go with the staging folder)."""
    if moves and is_local(fs):
        fs.makedirs(join(root, layout.LATENTS), exist_ok=True)
    for src, dst in moves.items():
        if is_local(fs):
            os.replace(fs._strip_protocol(join(root, src)), fs._strip_protocol(join(root, dst)))
        else:
            server_copy(fs, join(root, src), join(root, dst))


def _remove_staged(fs, root: str, shard_id: str, staged: list[str]) -> None:
    """After a commit: its staging folder. On object stores the staged files it knows and the
    intent go in one bulk delete, no listing (files of failed attempts stay until the next run's
    start removes _staging/)."""
    if is_local(fs):
        remove_staging(fs, root, shard_id)
    else:
        fs.rm([join(root, name) for name in [*staged, f"{layout.staging_dir(shard_id)}/{layout.COMMIT_INTENT}"]])


def remove_staging(fs, root: str, shard_id: str) -> None:
    """The shard's staging folder, one listing and one bulk delete on S3."""
    path = join(root, layout.staging_dir(shard_id))
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)

