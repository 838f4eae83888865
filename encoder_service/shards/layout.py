"""Where everything lives in an output folder. The folder is a plain Parquet dataset: `latents/`
holds latent data files and nothing else, `errors/` the ledger; bookkeeping lives under names that
start with `_`, which pyarrow, Spark, DuckDB, polars and HF datasets skip.

    latents/part-<shard>-<unit>.parquet   latent rows (records.LatentRow); a shard has one or more
    errors/errors-<shard>.parquet         ledger rows (records.LedgerRow)
    _manifests/<shard>.json               a shard's files, counts, checksums and statistics: written
                                          last, it is what makes the shard complete
    _settings.json                        the latent-affecting settings the folder belongs to
    _staging/<shard>/                     data files written by encoder actors, not yet committed
    _staging/<shard>/_commit.json         a commit's intent: the files it may leave in latents/ and errors/
                                          if cut off (the next run removes them)
    _staging/_tmp-<uuid>                  a local file being published (renamed into place whole)
    _index/seg-<seq>.parquet              the folder index: one records.ShardRecord per committed shard,
                                          appended by each run, compacted now and then (shards/index.py)
    _lease/<generation>.json              who runs on the folder now (shards/lease.py)
    _runs/<time>-<run>.json               one record per invocation
    summary.json                          the whole folder, merged from the index and the run's commits
"""
LATENTS, ERRORS, MANIFESTS, STAGING, RUNS = "latents", "errors", "_manifests", "_staging", "_runs"
INDEX, LEASE = "_index", "_lease"
SETTINGS, SUMMARY = "_settings.json", "summary.json"
COMMIT_INTENT, LOCAL_TMP_PREFIX = "_commit.json", "_tmp-"


def data_name(shard_id: str, unit: int) -> str:
    return f"{LATENTS}/part-{shard_id}-{unit:05d}.parquet"


def errors_name(shard_id: str) -> str:
    return f"{ERRORS}/errors-{shard_id}.parquet"


def manifest_name(shard_id: str) -> str:
    return f"{MANIFESTS}/{shard_id}.json"


def staging_dir(shard_id: str) -> str:
    return f"{STAGING}/{shard_id}"


def data_prefix(shard_id: str) -> str:
    """Every data file of a shard starts with this (the shard id is followed by '-' and 5 digits)."""
    return f"{LATENTS}/part-{shard_id}-"


def shard_of(file_name: str) -> str | None:
    """The shard id of a data file name (part-<shard>-<unit>.parquet) or ledger file name."""
    if file_name.startswith("part-") and file_name.endswith(".parquet"):
        return file_name[len("part-"):-len(".parquet")].rsplit("-", 1)[0]
    if file_name.startswith("errors-") and file_name.endswith(".parquet"):
        return file_name[len("errors-"):-len(".parquet")]
    return None


def segment_name(seq: int) -> str:
    return f"{INDEX}/seg-{seq:012d}.parquet"


def segment_seq(file_name: str) -> int | None:
    """The sequence number of an index segment file name, None for anything else."""
    stem = file_name[len("seg-"):-len(".parquet")]
    return int(stem) if file_name.startswith("seg-") and file_name.endswith(".parquet") and stem.isdigit() else None
