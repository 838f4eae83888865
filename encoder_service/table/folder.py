"""The output folder as one object: its store, its layout (table/layout.py) and its two Delta tables,
written and read with delta-rs (`deltalake`).

    latents table (the folder's root)  latent rows; a shard's data files are added in one commit, and
                                       a redone shard's old files are removed in that same commit
    shards table (_shards/)            one records.ShardRecord per committed shard: what it was made from,
                                       counts, statistics, QA, its files and its ledger rows

A group commit is two Delta commits, latents first: (1) the latents table adds the group's new files
and removes the files its shards held before, (2) the shards table appends the group's records,
each naming the latents version of (1). Delta has no transaction over two tables, so the rule that
makes them one is: **a shard is committed when its current record (its row with the largest
`commit`) names exactly the latents table's files of that shard.** A crash between (1) and (2)
leaves a shard whose files disagree with its record: planning finds it (two anti-joins, Arrow) and
redoes it, and the redo's commit removes those files. So a reader of the latents table sees each
shard whole or not at all and never twice, and its ledger rows and counts (shards table) are seen
exactly when they describe those files.

Settings: the folder's latent-affecting settings are the latents table's description (JSON).
Nothing here lists a folder or asks per shard: opening a table reads its last checkpoint and the
commits after it.
"""
import json
import os
import time
import uuid
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError
from deltalake.transaction import AddAction, CommitProperties, PostCommitHookProperties, RemoveAction

from encoder_service import records
from encoder_service.records import DataFile, LatentRow, ShardRecord
from encoder_service.storage import StorageOptions, filesystem, is_local, join, list_names, scrub
from encoder_service.table import layout
from encoder_service.table.writer import write_table_file

LATENT_SCHEMA = records.schema(LatentRow)
SHARD_SCHEMA = records.schema(ShardRecord)
SHARDS_FILES_BEFORE_COMPACTION = 8     # the shards table is rewritten as one file when it has more
WHOLE_READ_BYTES = 64 << 20            # a shards-table file this small is read in one request


class FolderError(Exception):
    """The folder cannot be used as it is (a damaged log, a folder of an older layout): one line."""


@dataclass(frozen=True)
class ShardCommit:
    record: ShardRecord             # files: the shard's new data files
    old: dict[str, int]             # path -> bytes of the shard's files in the latents table now


@dataclass
class Committed:
    """What the folder's tables say is committed: current records of consistent shards, and the
    latents table's files."""
    records: pa.Table               # shard_id, settings, input, ... (one row per committed shard)
    files: pa.Table                 # path, shard_id, bytes, rows, first_key
    disagree: pa.Array              # shard ids whose record and files disagree: not committed

    @classmethod
    def read(cls, folder: "OutputFolder", latents: DeltaTable, shards: DeltaTable | None = None,
             columns: list[str] | None = None) -> "Committed":
        """columns: of the records (default all; "files" is always read)."""
        files = OutputFolder.files(latents)
        records = folder.records(None if columns is None else sorted({*columns, "files"}), table=shards)
        bad = OutputFolder.consistent(records, files) if records.num_rows else pc.unique(files["shard_id"])
        if records.num_rows:
            records = records.filter(pc.invert(pc.is_in(records["shard_id"], bad)))
        return cls(records, files, bad)


class OutputFolder:
    def __init__(self, url: str, storage: StorageOptions | None = None):
        self.url, self.storage = url.rstrip("/"), storage or StorageOptions()
        self.fs, root = filesystem(self.url, self.storage)
        self.root = root.rstrip("/")
        self.delta_options = self.storage.for_delta(self.url)
        self._entries: set[str] | None = None

    # ---- names ------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """A path inside the folder, for its fsspec filesystem."""
        return join(self.root, *parts)

    def uri(self, *parts: str) -> str:
        """A URI inside the folder, for delta-rs (absolute local paths, s3://bucket/key)."""
        base = os.path.abspath(self.fs._strip_protocol(self.root)) if is_local(self.fs) else \
            f"{self.url.split('://')[0]}://{self.root}"
        return join(base, *parts)

    # ---- what is there ---------------------------------------------------------------------------
    def entries(self) -> set[str]:
        """Names directly in the folder, files and folders (one listing; cached until create())."""
        if self._entries is None:
            self._entries = set(list_names(self.fs, self.root))
        return self._entries

    def is_table(self) -> bool:
        return layout.DELTA_LOG in self.entries()

    def is_legacy(self) -> bool:
        """A folder of manifests and an index (schema 2/3) not yet migrated to a table."""
        return not self.is_table() and bool(self.entries() & set(layout.LEGACY_MARKERS))

    def latents(self, version: int | None = None) -> DeltaTable:
        return self._open(self.uri(), version)

    def shards(self) -> DeltaTable:
        return self._open(self.uri(layout.SHARDS), None)

    def _open(self, uri: str, version: int | None) -> DeltaTable:
        try:
            return DeltaTable(uri, version=version, storage_options=self.delta_options)
        except TableNotFoundError:
            raise FolderError(f"{scrub(uri)} is not a Delta table (no _delta_log/): not an output folder of this "
                              "service, or nothing was committed to it yet") from None
        except (DeltaError, OSError, ValueError) as exc:
            raise FolderError(scrub(f"{uri}: its Delta log cannot be read ({type(exc).__name__}: "
                                    f"{_first_line(exc)}); restore the damaged _delta_log/ file from a backup, or "
                                    "encode into a new folder")) from None

    # ---- settings (the latents table's description) ---------------------------------------------
    def create(self, settings: dict) -> None:
        """Both tables, empty, with the folder's settings: {"fingerprint": ..., "settings": {...}}."""
        self._entries = None
        description = json.dumps(settings, sort_keys=True)
        DeltaTable.create(self.uri(), LATENT_SCHEMA, mode="ignore", description=description,
                          storage_options=self.delta_options)
        DeltaTable.create(self.uri(layout.SHARDS), SHARD_SCHEMA, mode="ignore", storage_options=self.delta_options)

    @staticmethod
    def settings(table: DeltaTable) -> dict | None:
        try:
            return json.loads(table.metadata().description or "null")
        except ValueError:
            return None

    @staticmethod
    def set_settings(table: DeltaTable, settings: dict) -> None:
        table.alter.set_table_description(json.dumps(settings, sort_keys=True))

    # ---- reading the log ----------------------------------------------------------------------------
    @staticmethod
    def files(table: DeltaTable) -> pa.Table:
        """The version's data files: path, shard_id, bytes, rows, first_key, bucket (the log's statistics)."""
        actions = pa.table(table.get_add_actions(flatten=True))
        paths = actions["path"]
        shards = pc.extract_regex(paths, layout.DATA_PATH.pattern)
        def stat(name):
            return actions[name] if name in actions.column_names else pa.nulls(len(paths), pa.string())
        return pa.table({"path": paths, "shard_id": pc.struct_field(shards, "shard"), "bytes": actions["size_bytes"],
                         "rows": actions["num_records"], "first_key": stat("min.key"), "bucket": stat("min.bucket")})

    def records(self, columns: list[str] | None = None, table: DeltaTable | None = None) -> pa.Table:
        """Every shard's current record (its row with the largest commit), the given columns, from the
        shards table (opened here unless given)."""
        table = table or self.shards()
        wanted = None if columns is None else sorted({"shard_id", "commit", *columns})
        files = pa.table(table.get_add_actions())
        parts = [self._read_shards_file(path, size, wanted) for path, size in
                 zip(files["path"].to_pylist(), files["size_bytes"].to_pylist())]
        rows = pa.concat_tables(parts) if parts else SHARD_SCHEMA.empty_table().select(wanted or SHARD_SCHEMA.names)
        if rows.num_rows == 0:
            return rows
        keys = pa.table({"shard_id": rows["shard_id"], "commit": rows["commit"], "row": pa.array(range(rows.num_rows))})
        newest = keys.group_by("shard_id").aggregate([("commit", "max")]).rename_columns(["shard_id", "commit"])
        current = keys.join(newest, ["shard_id", "commit"], join_type="inner")["row"]
        return rows.take(current.take(pc.sort_indices(current)))  # in the table's order

    def _read_shards_file(self, name: str, size: int, columns: list[str] | None) -> pa.Table:
        """One file of the shards table: small ones (what compaction leaves below WHOLE_READ_BYTES) in
        one request, larger ones by column chunks."""
        path = self.path(layout.SHARDS, name)
        if not is_local(self.fs) and size <= WHOLE_READ_BYTES:
            source = pa.BufferReader(self.fs.cat_file(path, start=0, end=size))  # a range: no HEAD first
        else:
            source = path if is_local(self.fs) else self.fs.open(path, "rb")
        return pq.read_table(source, columns=columns, schema=SHARD_SCHEMA, use_threads=False)

    @staticmethod
    def consistent(records: pa.Table, files: pa.Table) -> pa.Array:
        """Shard ids whose record and latents files disagree (a group commit cut off between its two
        commits, or files added by hand): they count as not committed."""
        lists = records["files"].combine_chunks()
        named = pa.table({"shard_id": pc.take(records["shard_id"], pc.list_parent_indices(lists)),
                          "path": pc.list_flatten(lists).field("name")})
        missing = named.join(files.select(["path"]), "path", join_type="left anti")["shard_id"]
        extra = files.select(["path", "shard_id"]).join(named.select(["path"]), "path", join_type="left anti")
        return pc.unique(pa.chunked_array([missing.combine_chunks().cast(pa.string()),
                                           extra["shard_id"].combine_chunks().cast(pa.string())]))

    # ---- committing ---------------------------------------------------------------------------------
    def commit(self, latents: DeltaTable, shards: DeltaTable, group: list[ShardCommit], run_id: str) -> int:
        """One group commit (see the module's docstring); returns the latents table's new version."""
        now = int(time.time() * 1000)
        actions = []
        for c in group:
            new = {f.name: f for f in c.record.files}
            actions += [_add(f, now) for name, f in new.items() if name not in c.old]
            actions += [RemoveAction(p, True, now, size) for p, size in c.old.items() if p not in new]
        ids = sorted(c.record.shard_id for c in group)
        props = CommitProperties(custom_metadata={"wfvae": {"run": run_id, "shards": len(ids),
                                                            "first_shard": ids[0], "last_shard": ids[-1]}})
        latents.create_write_transaction(actions, "append", LATENT_SCHEMA, commit_properties=props)
        latents.update_incremental()  # the object does not follow its own commits; the lease makes it the only writer
        version = latents.version()
        rows = [replace(c.record, commit=version) for c in group]
        self._add_shard_rows(shards, rows, f"part-{version:020d}-{uuid.uuid4().hex[:8]}.parquet", "append")
        return version

    def _add_shard_rows(self, shards: DeltaTable, rows: list[ShardRecord] | pa.Table, name: str, mode: str) -> None:
        table = rows if isinstance(rows, pa.Table) else records.to_table(rows, ShardRecord)
        size = write_table_file(self, self.path(layout.SHARDS, name), table)
        stats = {"numRecords": table.num_rows}
        shards.create_write_transaction([AddAction(name, size, {}, int(time.time() * 1000), True, json.dumps(stats))],
                                        mode, SHARD_SCHEMA,
                                        post_commithook_properties=PostCommitHookProperties(create_checkpoint=True))
        shards.update_incremental()

    def remove_temporaries(self) -> None:
        """Local files being written when a run stopped (call under the lease: no live run writes them)."""
        if is_local(self.fs) and self.fs.exists(self.path(layout.LOCAL_TMP)):
            self.fs.rm(self.path(layout.LOCAL_TMP), recursive=True)

    # ---- the end of a run -------------------------------------------------------------------------
    def finish(self, retention_hours: int) -> dict:
        """Compact the shards table (its current records as one file, when it has many), checkpoint
        both logs (readers replay few commit files), vacuum both: files no current version references
        and older than the retention are deleted. Returns what was done."""
        shards = self.shards()
        if len(shards.file_uris()) > SHARDS_FILES_BEFORE_COMPACTION:
            current = self.records()
            self._add_shard_rows(shards, current, f"part-compact-{shards.version() + 1:020d}.parquet", "overwrite")
        removed = {}
        for name, table in (("latents", self.latents()), ("shards", self.shards())):
            table.create_checkpoint()
            removed[name] = len(table.vacuum(retention_hours=retention_hours, dry_run=False, full=True,
                                             enforce_retention_duration=False))
        return {"vacuumed_files": removed}


def _add(f: DataFile, now: int) -> AddAction:
    stats = {"numRecords": f.rows, "minValues": {"key": f.first_key, "bucket": f.bucket},
             "maxValues": {"key": f.last_key, "bucket": f.bucket}, "nullCount": {"key": 0, "bucket": 0}}
    return AddAction(f.name, f.bytes, {}, now, True, json.dumps(stats))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
