"""Where everything lives in an output folder. The folder is a Delta Lake table of latent rows
(records.LatentRow): read it through its log (`deltalake`, Polars, DuckDB, Spark, Ray), never by
listing `latents/`, which may hold files no current version references until `vacuum` removes them.
Bookkeeping lives under names that start with `_`, which Delta's vacuum and Parquet readers skip.

    _delta_log/                           the latents table's log (delta-rs): the one authority
    latents/part-<shard>-<unit>-<hash>.parquet
                                          latent rows of one encoder call; <hash>: the first 16 hex
                                          digits of the file's sha256, so the same rows get the same name
    _shards/                              the shards table (Delta): one records.ShardRecord per committed
                                          shard (input, settings, counts, statistics, QA, files, ledger)
    _lease/<generation>.json              who runs on the folder now (table/lease.py)
    _runs/<time>-<run>.json               one record per invocation
    _summary.json                         the whole folder after the last run (also what `inspect` computes)

A folder written before the table (schema 2/3: _manifests/, _index/, errors/) is converted by
`python -m encoder_service migrate FOLDER` (table/migrate.py).
"""
import re

LATENTS, SHARDS, RUNS, LEASE, DELTA_LOG = "latents", "_shards", "_runs", "_lease", "_delta_log"
SUMMARY, LOCAL_TMP = "_summary.json", "_tmp"
LEGACY_MARKERS = ("_manifests", "_index")   # folders of schema 2/3, before the table
HASH_DIGITS = 16

# part-<shard>-<unit>[-<hash>].parquet: the hash is absent from files of migrated folders
DATA_PATH = re.compile(rf"^{LATENTS}/part-(?P<shard>.+)-\d{{5}}(?:-[0-9a-f]{{{HASH_DIGITS}}})?\.parquet$")


def data_name(shard_id: str, unit: int, sha256: str) -> str:
    return f"{LATENTS}/part-{shard_id}-{unit:05d}-{sha256[:HASH_DIGITS]}.parquet"
