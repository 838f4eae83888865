"""`python -m encoder_service migrate FOLDER`: a folder written before output folders became Delta
tables (schema 2/3: per-shard manifests in _manifests/, ledgers in errors/, an index in _index/,
settings in _settings.json) converted into one in place, idempotently.

Each manifest becomes a shard record (table/folder.py) whose data files stay where they are (their
names without a hash are still data file names); the files are added to the latents table with the
row counts their manifests give and key/bucket statistics read from their footers and first rows
(one-time requests per file; the job never pays them). Shards are committed in groups, so a
migration cut off anywhere is finished by running it again: shards already in the table are
skipped. Once every manifest is in, the old bookkeeping is deleted; files in latents/ that no
manifest listed (commits cut off before their manifest) stay unreferenced until vacuum.
"""
import argparse
import json
import sys

import pyarrow.compute as pc
import pyarrow.parquet as pq

from encoder_service.records import (
    ChannelStats,
    DataFile,
    InputIdentity,
    LedgerRow,
    QaRow,
    ShardRecord,
    ShardStats,
    from_dict,
)
from encoder_service.storage import StorageOptions, list_prefix, retry, scrub
from encoder_service.table import totals
from encoder_service.table.folder import Committed, FolderError, OutputFolder, ShardCommit

GROUP = 500
_LEGACY = ("_manifests", "_index", "errors", "_staging", "_settings.json", "summary.json")


def migrate(url: str, storage: StorageOptions | None = None, log=print) -> dict:
    folder = OutputFolder(url, storage)
    names = sorted(e.name for e in list_prefix(folder.fs, folder.path("_manifests")) if e.name.endswith(".json"))
    if not names and not folder.fs.exists(folder.path("_settings.json")):
        if folder.is_table():
            log(f"[migrate] {url} is a Delta table already: nothing to do")
            return {"shards": 0, "already": True}
        raise FolderError(f"{url} holds no manifests or settings of an older output folder: nothing to migrate")
    settings = json.loads(folder.fs.cat_file(folder.path("_settings.json")))
    folder.create({"fingerprint": settings["fingerprint"], "settings": settings["settings"]})
    latents, shards = folder.latents(), folder.shards()
    done = set(Committed.read(folder, latents).records["shard_id"].to_pylist())
    todo = [n[:-len(".json")] for n in names if n[:-len(".json")] not in done]
    for start in range(0, len(todo), GROUP):
        group = [ShardCommit(_record(folder, sid), {}) for sid in todo[start:start + GROUP]]
        folder.commit(latents, shards, group, "migrate")
        log(f"[migrate] {min(start + GROUP, len(todo))}/{len(todo)} shards")
    for name in _LEGACY:
        if folder.fs.exists(folder.path(name)):
            folder.fs.rm(folder.path(name), recursive=True)
    folder.latents().create_checkpoint()
    folder.remove_temporaries()
    log(f"[migrate] {url}: {len(todo)} shards moved into the table ({len(done)} were already), old bookkeeping "
        "removed")
    return {"shards": len(todo), "already": len(done)}


def _record(folder: OutputFolder, shard_id: str) -> ShardRecord:
    raw = json.loads(retry(lambda: folder.fs.cat_file(folder.path("_manifests", f"{shard_id}.json"))))
    run = raw["run"]
    stats = {kind: ({k: s[k] for k in ("count", "sum", "sum_sq")} if s else None)
             for kind, s in (raw.get("stats") or {}).items()}
    files = [_data_file(folder, f) for f in raw["files"]]
    ledger = _ledger(folder, raw["errors"]["name"]) if raw.get("errors", {}).get("name") else []
    qa_rows = [from_dict(QaRow, q) for q in raw.get("qa") or []]
    return ShardRecord(shard_id, scrub(raw.get("source_url", "")), raw.get("settings") or run.get("settings", ""),
                       from_dict(InputIdentity, raw.get("input")), run["vae_sha256"], raw["clips"], raw["latents"],
                       dict(raw.get("ledger_reasons") or {}), raw.get("non_finite_rejected", 0),
                       sum(f.bytes for f in files),
                       ShardStats(*(from_dict(ChannelStats, stats.get(k)) for k in ("mean", "logvar"))),
                       totals.qa_summary(qa_rows), files, ledger, qa_rows)


def _data_file(folder: OutputFolder, entry: dict) -> DataFile:
    with folder.fs.open(folder.path(entry["name"]), "rb") as f:
        pf = pq.ParquetFile(f)
        keys = pf.read_row_group(0, columns=["key", "bucket"]) if pf.metadata.num_row_groups else None
        last = pf.read_row_group(pf.metadata.num_row_groups - 1, columns=["key"]) if keys is not None else None
    first_key = pc.min(keys["key"]).as_py() if keys is not None else ""
    last_key = pc.max(last["key"]).as_py() if last is not None else ""
    bucket = keys["bucket"][0].as_py() if keys is not None and keys.num_rows else ""
    return DataFile(entry["name"], entry["rows"], entry["bytes"], entry["sha256"], first_key, last_key, bucket)


def _ledger(folder: OutputFolder, name: str) -> list[LedgerRow]:
    try:
        with folder.fs.open(folder.path(name), "rb") as f:
            rows = pq.read_table(f, use_threads=False).to_pylist()
    except FileNotFoundError:
        return []
    return [LedgerRow(r["key"], r["source_url"], r["stage"], r["reason"], r["message"]) for r in rows]


def add_parser(sub) -> None:
    p = sub.add_parser("migrate", help="convert an output folder of an older layout into a Delta table, in place",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the output folder (local or s3://)")
    p.add_argument("--s3-endpoint-url")


def run(args) -> int:
    try:
        migrate(args.folder, StorageOptions(endpoint_url=args.s3_endpoint_url))
    except (FolderError, OSError, KeyError, ValueError) as exc:
        print(scrub(f"error: {args.folder}: {type(exc).__name__}: {exc}"), file=sys.stderr)
        return 2
    return 0


__all__ = ["add_parser", "migrate", "run"]
