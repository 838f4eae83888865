"""Where everything lives in an output folder. The folder is a plain Parquet dataset: `latents/`
holds latent data files and nothing else, `errors/` the ledger; bookkeeping lives under names that
start with `_`, which pyarrow, Spark, DuckDB, polars and HF datasets skip.

    latents/part-<shard>-<unit>.parquet   latent rows (records.LatentRow); a shard has one or more
    errors/errors-<shard>.parquet         ledger rows (records.LedgerRow)
    _manifests/<shard>.json               a shard's files, counts, checksums and statistics: written
                                          last, it is what makes the shard complete
    _settings.json                        the latent-affecting settings the folder belongs to
    _staging/<shard>/                     data files written by encoder actors, not yet committed
    _runs/<time>-<run>.json               one record per invocation
    summary.json                          the whole folder, recomputed from the manifests each run
"""
LATENTS, ERRORS, MANIFESTS, STAGING, RUNS = "latents", "errors", "_manifests", "_staging", "_runs"
SETTINGS, SUMMARY = "_settings.json", "summary.json"


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
