"""An output folder's bookkeeping for N committed shards, made without encoding anything: input
shards (tiny files), one manifest per shard (WF-VAE-L's 16 channels of statistics, `files_per_shard`
data files listed), and the folder index, as a run of this version leaves them. Planning, `inspect`
and the benchmarks of scale read it exactly as they read a real folder (the data files themselves
are not made: nothing at planning reads them unless --verify-existing asks)."""
import dataclasses
import random
from concurrent.futures import ThreadPoolExecutor

from encoder_service import records
from encoder_service.ingest.inputs import input_identities
from encoder_service.records import ChannelStats, DataFile, Manifest, QaRow, RunMeta, ShardStats
from encoder_service.table import index, layout, totals
from encoder_service.table.schema import SCHEMA_VERSION
from encoder_service.storage import filesystem, is_local, join, list_prefix

CHANNELS = 16


def input_urls(folder: str, n: int) -> list[str]:
    return [f"{folder.rstrip('/')}/shard-{i:07d}.tar" for i in range(n)]


def write_inputs(urls: list[str], storage=None) -> None:
    fs, _ = filesystem(urls[0], storage)
    _put_many(fs, {filesystem(u, storage)[1]: f"tar {u}".encode() for u in urls})


def manifest(shard_id: str, settings: str, run: RunMeta, identity, files_per_shard: int, seed: int) -> Manifest:
    rng = random.Random(seed)
    stats = ShardStats(*(ChannelStats([4096] * CHANNELS, [rng.gauss(0, 50) for _ in range(CHANNELS)],
                                      [4096 + rng.random() for _ in range(CHANNELS)]) for _ in range(2)))
    files = [DataFile(layout.data_name(shard_id, u), 100, 32 << 20, "0" * 64) for u in range(files_per_shard)]
    qa = [QaRow(f"{shard_id}/s/0", rng.random() * 1e-2, rng.random() * 1e-2, 30.0, 0.9)] if seed % 5 == 0 else []
    return Manifest(SCHEMA_VERSION, shard_id, settings, run, f"s3://in/{shard_id}.tar", identity, 100, 100,
                    {"probe/corrupt": 1}, 0, stats, qa, files, DataFile(layout.errors_name(shard_id), 1, 900, "0" * 64))


def write_committed(output: str, urls: list[str], settings: str, run: RunMeta, storage=None,
                    files_per_shard: int = 1, indexed: bool = True) -> None:
    """Manifests (and, `indexed`, the index segment) of every input in `urls`, as committed."""
    fs, root = filesystem(output, storage)
    identities = input_identities(urls, storage)
    made = {}
    for i, url in enumerate(urls):
        sid = url.rsplit("/", 1)[1][:-len(".tar")]
        made[join(root, layout.manifest_name(sid))] = (sid, manifest(sid, settings, run, identities.get(url),
                                                                     files_per_shard, i))
    _put_many(fs, {path: records.to_json(m) for path, (_, m) in made.items()})
    if indexed:
        listed = {e.name[:-len(".json")]: e for e in list_prefix(fs, join(root, layout.MANIFESTS))}
        rows = [totals.shard_record(m, listed[sid].size, listed[sid].tag) for sid, m in made.values()]
        index.write_segment(fs, root, max(index.segments(fs, root), default=0) + 1, rows)


def _put_many(fs, files: dict[str, bytes]) -> None:
    if is_local(fs):
        for path in {p.rsplit("/", 1)[0] for p in files}:
            fs.makedirs(path, exist_ok=True)
        for path, data in files.items():
            with open(path, "wb") as f:
                f.write(data)
        return
    items = list(files.items())
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: fs.pipe_file(kv[0], kv[1]), items))


def run_meta(fp: str = "") -> RunMeta:
    return dataclasses.replace(RunMeta("wfvae-l-16chn", "ab" * 32, "bf16", "bench", [1.0] * CHANNELS,
                                       [0.0] * CHANNELS), settings=fp)
