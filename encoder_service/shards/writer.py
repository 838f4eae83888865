"""Write one input shard's latents as one Parquet file, its error ledger beside it, then the manifest.

Commit protocol: each Parquet file is written to a local temporary file (hashed as it is
checked), then moved into place (rename on local disk; a single upload on object stores, where an
object appears only complete); the manifest with row counts, sizes and sha256 is written last.
A reader or a later run treats a shard without a matching manifest as partial and redoes it.
"""
import json
import os
import tempfile
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from encoder_service.shards.manifest import errors_name, manifest_name, part_name
from encoder_service.shards.schema import ERROR_SCHEMA, LATENT_SCHEMA, SCHEMA_VERSION, run_metadata
import fsspec

from encoder_service.storage import is_local, join, retry, sha256_of

LOCAL = fsspec.filesystem("file")
ROW_GROUP_BYTES = 64 << 20  # ~64 MiB row groups: large sequential reads, several per shard for workers


class ShardWriter:
    def __init__(self, fs, directory: str, run_meta: dict[str, str], row_group_bytes: int = ROW_GROUP_BYTES):
        self.fs, self.directory, self.run_meta, self.row_group_bytes = fs, directory.rstrip("/"), run_meta, row_group_bytes
        retry(lambda: fs.makedirs(self.directory, exist_ok=True))

    def write(self, shard_id: str, rows: list[dict], errors: list[dict]) -> dict:
        """Write the shard's latents and errors and commit its manifest; returns the manifest."""
        rows = sorted(rows, key=lambda r: r["key"])  # deterministic bytes whatever the arrival order
        errors = sorted(errors, key=lambda r: (r["key"], r["stage"], r["reason"]))
        files = {part_name(shard_id): self._put(part_name(shard_id), self._table(rows, LATENT_SCHEMA)),
                 errors_name(shard_id): self._put(errors_name(shard_id), self._table(errors, ERROR_SCHEMA))}
        manifest = {"schema_version": SCHEMA_VERSION, "shard_id": shard_id, "rows": len(rows),
                    "error_rows": len(errors), "files": files, "run": self.run_meta,
                    "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._put_bytes(manifest_name(shard_id), json.dumps(manifest, indent=1, sort_keys=True).encode())
        return manifest

    def _table(self, rows, schema) -> pa.Table:
        table = pa.Table.from_pylist(rows, schema=schema)
        return table.replace_schema_metadata(run_metadata(self.run_meta))

    def _row_group_rows(self, table: pa.Table) -> int:
        per_row = max(1, table.nbytes // max(1, table.num_rows))
        return max(1, min(table.num_rows, self.row_group_bytes // per_row))

    def _put(self, name: str, table: pa.Table) -> dict:
        with tempfile.NamedTemporaryFile(suffix=".parquet", delete=False) as tmp:
            local = tmp.name
        try:
            pq.write_table(table, local, compression="zstd", row_group_size=self._row_group_rows(table),
                           use_dictionary=["source_url", "bucket", "vae_name", "vae_sha256", "latent_dtype",
                                           "precision", "pipeline_version", "stage", "reason"],
                           write_statistics=["key"])
            entry = {"bytes": os.path.getsize(local), "sha256": sha256_of(LOCAL, local)}
            self._move_in(local, name)
        finally:
            if os.path.exists(local):
                os.unlink(local)
        return entry

    def _put_bytes(self, name: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(delete=False) as tmp:
            tmp.write(data)
        try:
            self._move_in(tmp.name, name)
        finally:
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)

    def _move_in(self, local: str, name: str) -> None:
        final = join(self.directory, name)
        if is_local(self.fs):  # same-filesystem rename is atomic; copy to a temp name beside it first
            staging = f"{final}.tmp-{uuid.uuid4().hex}"
            self.fs.put_file(local, staging)
            os.replace(staging, final)
        else:  # object stores publish an object only once its upload completes
            retry(lambda: self.fs.put_file(local, final), what=f"upload {final}")


def write_shard(fs, directory: str, shard_id: str, rows: list[dict], errors: list[dict],
                run_meta: dict[str, str]) -> dict:
    return ShardWriter(fs, directory, run_meta).write(shard_id, rows, errors)
