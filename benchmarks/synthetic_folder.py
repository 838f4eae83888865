"""Output folders made without encoding anything, through the project's own writer and commits
(table/writer.py, table/folder.py), for tests and the benchmarks of scale:

  * `commit_rows`: real latent rows of given shards, one data file per unit of one bucket, committed
    as the job commits them (group commits, old files of a shard replaced);
  * `commit_synthetic`: N shard records with WF-VAE-L's 16 channels of statistics, a ledger row
    each and `files_per_shard` data files that are named in the log but never written: planning,
    `inspect` and opening the reader read the logs only, so they pay exactly what they pay on a real
    folder of that size.
"""
import dataclasses
import json
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from encoder_service.ingest.inputs import input_identities
from encoder_service.records import (
    ChannelStats,
    DataFile,
    LatentRow,
    LedgerRow,
    QaRow,
    RunMeta,
    ShardRecord,
    ShardStats,
)
from encoder_service.storage import filesystem, is_local
from encoder_service.table import layout, totals
from encoder_service.table.folder import OutputFolder, ShardCommit
from encoder_service.table.writer import UnitWriter

CHANNELS = 16


def run_meta(fp: str = "") -> RunMeta:
    return dataclasses.replace(RunMeta("wfvae-l-16chn", "ab" * 32, "bf16", "bench", [1.0] * CHANNELS,
                                       [0.0] * CHANNELS), settings=fp)


def table_folder(url: str, fingerprint: str = "bench", storage=None, settings: dict | None = None) -> OutputFolder:
    folder = OutputFolder(url, storage)
    if not folder.is_table():
        folder.create({"fingerprint": fingerprint, "settings": settings or {"bench": True}})
    return folder


def record(shard_id: str, files: list[DataFile], ledger: list[LedgerRow], fp: str, run: RunMeta, identity=None,
           seed: int = 0, clips: int | None = None) -> ShardRecord:
    rng = random.Random(seed)
    stats = ShardStats(*(ChannelStats([4096] * CHANNELS, [rng.gauss(0, 50) for _ in range(CHANNELS)],
                                      [4096 + rng.random() for _ in range(CHANNELS)]) for _ in range(2)))
    qa = [QaRow(f"{shard_id}/s/0", rng.random() * 1e-2, rng.random() * 1e-2, 30.0, 0.9)] if seed % 5 == 0 else []
    latents = sum(f.rows for f in files)
    reasons = defaultdict(int)
    for row in ledger:
        reasons[f"{row.stage}/{row.reason}"] += 1
    return ShardRecord(shard_id, f"s3://in/{shard_id}.tar", fp, identity, run.vae_sha256,
                       latents + len(ledger) if clips is None else clips, latents, dict(reasons), 0,
                       sum(f.bytes for f in files), stats, totals.qa_summary(qa), files, ledger, qa)


def commit_rows(url: str, shards: dict[str, list[LatentRow]], ledgers: dict[str, list[LedgerRow]] | None = None,
                storage=None, run: RunMeta | None = None, fp: str = "bench", row_group_bytes: int = 64 << 20,
                rows_per_file: int | None = None) -> OutputFolder:
    """Write and commit shards of real latent rows (one group commit), replacing what they held."""
    run = run or run_meta(fp)
    folder = table_folder(url, fp, storage)
    writer = UnitWriter(folder, run, row_group_bytes)
    latents, table = folder.latents(), folder.shards()
    files_now = OutputFolder.files(latents)
    old = defaultdict(dict)
    for path, sid, size in zip(*(files_now[c].to_pylist() for c in ("path", "shard_id", "bytes"))):
        old[sid][path] = size
    group = []
    for sid, rows in shards.items():
        units = []
        for _, bucket_rows in sorted(_by_bucket(rows).items()):
            step = rows_per_file or len(bucket_rows)
            units += [bucket_rows[i:i + step] for i in range(0, len(bucket_rows), step)]
        files = [writer.write(sid, u, unit) for u, unit in enumerate(units)]
        ledger = (ledgers or {}).get(sid, [])
        group.append(ShardCommit(record(sid, files, ledger, fp, run), old.get(sid, {})))
    folder.commit(latents, table, group, "synthetic")
    return folder


def _by_bucket(rows: list[LatentRow]) -> dict[str, list[LatentRow]]:
    out = defaultdict(list)
    for r in rows:
        out[f"{r.bucket}/{tuple(r.latent_shape)}/{r.latent_dtype}"].append(r)
    return out


def input_urls(folder: str, n: int) -> list[str]:
    return [f"{folder.rstrip('/')}/shard-{i:07d}.tar" for i in range(n)]


def write_inputs(urls: list[str], storage=None) -> None:
    fs, _ = filesystem(urls[0], storage)
    files = {filesystem(u, storage)[1]: f"tar {u}".encode() for u in urls}
    if is_local(fs):
        for path in {p.rsplit("/", 1)[0] for p in files}:
            fs.makedirs(path, exist_ok=True)
        for path, data in files.items():
            with open(path, "wb") as f:
                f.write(data)
        return
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: fs.pipe_file(kv[0], kv[1]), files.items()))


def commit_synthetic(output: str, urls: list[str], fp: str, run: RunMeta, storage=None, files_per_shard: int = 1,
                     group: int = 10000, rows: int = 100) -> OutputFolder:
    """Records (and log entries for never-written data files) of every input in `urls`, committed in
    groups of `group` shards, then both logs checkpointed as the end of a run leaves them."""
    folder = table_folder(output, fp, storage)
    identities = input_identities(urls, storage)
    latents, table = folder.latents(), folder.shards()
    for start in range(0, len(urls), group):
        commits = []
        for i in range(start, min(start + group, len(urls))):
            sid = urls[i].rsplit("/", 1)[1][:-len(".tar")]
            files = [DataFile(layout.data_name(sid, u, f"{i:016x}"), rows, 32 << 20, "0" * 64, f"{sid}/a/0",
                              f"{sid}/z/0", "33x256x256") for u in range(files_per_shard)]
            ledger = [LedgerRow(f"{sid}/bad", urls[i], "probe", "corrupt" if i % 1000 else "rare_reason",
                                json.dumps({"shard": sid}))]
            commits.append(ShardCommit(record(sid, files, ledger, fp, run, identities.get(urls[i]), i), {}))
        folder.commit(latents, table, commits, "synthetic")
    latents.create_checkpoint()
    folder.shards().create_checkpoint()
    return folder
