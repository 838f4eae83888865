"""The folder index: which shards are committed, with which settings and from which input, and the
folder's totals, from listings instead of a request per shard.

    _manifests/           listed (one request per 1,000 shards on S3): which shards are committed,
                          and each manifest's size and tag (ETag on S3, mtime in ns locally)
    _index/seg-<seq>      Parquet segments of records.ShardRecord, one row per commit; a run appends
                          one segment every INDEX_FLUSH_SHARDS commits or INDEX_FLUSH_S seconds

A row describes a shard only while the listed manifest still has the size and tag the row
recorded: a manifest rewritten by a later run (or by hand) no longer matches, and a manifest
without a matching row (a run killed before its segment was written, a folder from schema 2) is
read itself, once, and its row written by the next run that holds the lease (`repair`). So the
index may lag the manifests but never lies about them; the manifests stay the truth.

Planning reads only the columns it needs; totals stream the segments in batches with the
arithmetic done by Arrow and numpy, so both cost a few microseconds per shard and hold no
manifest in memory. More than MAX_SEGMENTS segments are compacted into one.
"""
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from encoder_service import records
from encoder_service.records import ChannelStats, FolderTotals, InputIdentity, QaSummary, ShardRecord, ShardStats
from encoder_service.shards import layout, totals
from encoder_service.shards.manifest import ManifestUnreadable, read_manifest
from encoder_service.shards.writer import publish_table
from encoder_service.storage import join, list_prefix, retry

MAX_SEGMENTS = 16
INDEX_FLUSH_SHARDS, INDEX_FLUSH_S = 1000, 60.0
_PLAN_COLUMNS = ["shard_id", "settings", "input", "manifest_bytes", "manifest_tag"]
_BATCH_ROWS = 65536
# Segments are read without Arrow's thread pools: a parquet reader thread still alive at interpreter
# exit aborts the process ("terminate called without an active exception", apache/arrow#34314),
# which `inspect` hit in one run of ten once PyAV was loaded too.


class Indexed(NamedTuple):
    seq: int                      # the segment whose row describes the shard; -1: read from its manifest
    settings: str
    input: InputIdentity | None


@dataclass
class FolderIndex:
    shards: dict[str, Indexed] = field(default_factory=dict)     # every committed shard
    segments: list[int] = field(default_factory=list)            # segment numbers, oldest first
    unindexed: list[ShardRecord] = field(default_factory=list)   # committed, read from their manifests
    unreadable: list[str] = field(default_factory=list)          # _manifests/ files that are no manifest

    @property
    def next_seq(self) -> int:
        return (self.segments[-1] + 1) if self.segments else 1


def scan(fs, root: str, threads: int = 16) -> FolderIndex:
    """Which shards the folder holds: listings, the segments' planning columns, and a GET only for
    a manifest no segment row matches."""
    listed = {e.name[:-len(".json")]: (e.size, e.tag) for e in list_prefix(fs, join(root, layout.MANIFESTS))
              if e.name.endswith(".json")}
    index = FolderIndex(segments=segments(fs, root))
    settings_seen: dict[str, str] = {}  # one string object per fingerprint
    for seq in index.segments:
        table = _read_segment(fs, root, seq, _PLAN_COLUMNS)
        inputs = table["input"].to_pylist()
        for sid, fp, size, tag, inp in zip(table["shard_id"].to_pylist(), table["settings"].to_pylist(),
                                           table["manifest_bytes"].to_pylist(), table["manifest_tag"].to_pylist(),
                                           inputs):
            if listed.get(sid) == (size, tag):
                identity = InputIdentity(**inp) if inp else None
                index.shards[sid] = Indexed(seq, settings_seen.setdefault(fp, fp), identity)
    missing = [sid for sid in listed if sid not in index.shards]
    for sid, record in zip(missing, _read_records(fs, root, missing, listed, threads)):
        if record is None:
            index.unreadable.append(sid)
        else:
            index.unindexed.append(record)
            index.shards[sid] = Indexed(-1, record.settings, record.input)
    return index


def segments(fs, root: str) -> list[int]:
    """The folder's index segments, by number, oldest first (one listing)."""
    found = (layout.segment_seq(e.name) for e in list_prefix(fs, join(root, layout.INDEX), "seg-"))
    return sorted(s for s in found if s is not None)


def _read_records(fs, root: str, shard_ids: list[str], listed: dict, threads: int) -> list[ShardRecord | None]:
    def one(sid):
        try:
            manifest = read_manifest(fs, root, sid)
        except ManifestUnreadable:
            return None
        return totals.shard_record(manifest, *listed[sid]) if manifest else None
    if not shard_ids:
        return []
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, shard_ids))


def _read_segment(fs, root: str, seq: int, columns: list[str] | None = None) -> pa.Table:
    def read():
        with fs.open(join(root, layout.segment_name(seq)), "rb") as f:
            return pq.read_table(f, columns=columns, use_threads=False)
    return retry(read)


def write_segment(fs, root: str, seq: int, rows: list[ShardRecord]) -> None:
    publish_table(fs, root, join(root, layout.segment_name(seq)), records.to_table(rows, ShardRecord))


def repair(fs, root: str, index: FolderIndex) -> None:
    """Under the lease: index the shards read from their manifests, and compact the segments into
    one when there are more than MAX_SEGMENTS (older segments are deleted only after the new one is
    written: a crash in between leaves rows that the new segment overrides)."""
    if index.unindexed:
        write_segment(fs, root, index.next_seq, index.unindexed)
        index.segments.append(index.next_seq)
        index.shards.update({r.shard_id: index.shards[r.shard_id]._replace(seq=index.segments[-1])
                             for r in index.unindexed})
        index.unindexed = []
    if len(index.segments) > MAX_SEGMENTS:
        compact(fs, root, index)


def compact(fs, root: str, index: FolderIndex) -> None:
    seq, old = index.next_seq, list(index.segments)
    tables = [t.filter(_current_mask(t, s, index, frozenset())) for s in old for t in [_read_segment(fs, root, s)]]
    publish_table(fs, root, join(root, layout.segment_name(seq)), pa.concat_tables(tables))
    fs.rm([join(root, layout.segment_name(s)) for s in old])
    index.segments = [seq]
    index.shards = {sid: entry._replace(seq=seq) for sid, entry in index.shards.items()}


def _current_mask(table: pa.Table, seq: int, index: FolderIndex, exclude) -> pa.Array:
    shards = index.shards
    return pa.array([(e := shards.get(sid)) is not None and e.seq == seq and sid not in exclude
                     for sid in table["shard_id"].to_pylist()], pa.bool_())


def folder_totals(fs, root: str, index: FolderIndex, exclude: Iterable[str] = ()) -> tuple[FolderTotals, FolderTotals]:
    """(totals of the committed shards not in `exclude`, totals of those in it), streaming the
    segments in batches."""
    exclude = frozenset(exclude)
    kept, excluded = FolderTotals(), FolderTotals()
    for seq in index.segments:
        for batch in _segment_batches(fs, root, seq):
            table = pa.Table.from_batches([batch])
            keep = _current_mask(table, seq, index, exclude)
            ex = _current_mask(table, seq, index, frozenset()) if exclude else None
            kept = totals.add_totals(kept, _table_totals(table.filter(keep)))
            if ex is not None:
                excluded = totals.add_totals(excluded, _table_totals(table.filter(pc.and_(ex, pc.invert(keep)))))
    for record in index.unindexed:
        totals.add_shard(excluded if record.shard_id in exclude else kept, record)
    return kept, excluded


def _segment_batches(fs, root: str, seq: int):
    path = join(root, layout.segment_name(seq))
    with fs.open(path, "rb") as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS, use_threads=False)


def _table_totals(t: pa.Table) -> FolderTotals:
    """Totals of many index rows at once (Arrow and numpy, not a Python loop over stats)."""
    out = FolderTotals()
    if t.num_rows == 0:
        return out
    out.shards = t.num_rows
    out.clips, out.latents, out.non_finite_rejected, out.file_bytes = (
        int(pc.sum(t[c]).as_py() or 0) for c in ("clips", "latents", "non_finite_rejected", "file_bytes"))
    reasons = t["ledger_reasons"].combine_chunks()
    if len(reasons.keys):
        grouped = pa.table({"k": reasons.keys, "v": reasons.items}).group_by("k").aggregate([("v", "sum")])
        out.ledger_reasons = dict(zip(grouped["k"].to_pylist(), grouped["v_sum"].to_pylist()))
    out.checkpoints = sorted(c for c in pc.unique(t["checkpoint_sha256"]).to_pylist() if c)
    stats = t["stats"].combine_chunks()
    out.stats = ShardStats(_sum_stats(stats.field("mean")), _sum_stats(stats.field("logvar")))
    qa = t["qa"].combine_chunks()
    with_qa = qa.filter(pc.greater(qa.field("clips"), 0))
    for row in with_qa.to_pylist():
        out.qa = totals.add_qa(out.qa, records.from_dict(QaSummary, row))
    return out


def _sum_stats(column: pa.StructArray) -> ChannelStats | None:
    present = column.filter(column.is_valid())
    if len(present) == 0:
        return None
    sums = []
    for name in ("count", "sum", "sum_sq"):
        lists = present.field(name)
        channels = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
        if (channels != channels[0]).any():
            raise ValueError("the folder index holds statistics with different channel counts")
        values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).reshape(len(present), int(channels[0]))
        sums.append(values.sum(axis=0, dtype=np.int64 if name == "count" else np.float64).tolist())
    return ChannelStats(*sums)


class IndexWriter:
    """The driver's side: rows of the shards it commits, written as a segment every
    INDEX_FLUSH_SHARDS commits or INDEX_FLUSH_S seconds, and at the end."""

    def __init__(self, fs, root: str, index: FolderIndex):
        self.fs, self.root, self.index = fs, root, index
        self.pending: list[ShardRecord] = []
        self.last_flush = time.monotonic()

    def add(self, record: ShardRecord) -> None:
        self.pending.append(record)
        if len(self.pending) >= INDEX_FLUSH_SHARDS or time.monotonic() - self.last_flush > INDEX_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.pending:
            return
        seq = self.index.next_seq
        write_segment(self.fs, self.root, seq, self.pending)
        self.index.segments.append(seq)
        self.pending = []
