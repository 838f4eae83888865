"""Which shards to run: expand the inputs, name each shard, skip the ones already complete."""
from braceexpand import braceexpand

from encoder_service.ingest.tar_stream import shard_id_of
from encoder_service.shards import ShardStatus, shard_status
from encoder_service.storage import StorageOptions, filesystem, glob_urls


def expand_inputs(patterns: list[str], storage: StorageOptions | None = None) -> list[str]:
    """Brace ranges first, then globs; order kept, duplicates dropped."""
    urls = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            urls += glob_urls(url, storage) if any(c in url for c in "*?[") else [url]
    return list(dict.fromkeys(urls))


def plan_shards(urls: list[str], output: str, storage: StorageOptions | None, overwrite: bool,
                verify: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(shards to run as (url, shard_id), shard ids skipped because complete)."""
    ids = [shard_id_of(u) for u in urls]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"input shards share output names {dupes[:5]}: shard ids come from file names, "
                         "so shards in different folders must have different names")
    fs, out = filesystem(output, storage)
    todo, skipped = [], []
    for url, shard_id in zip(urls, ids):
        if not overwrite and shard_status(fs, out, shard_id, verify).status == ShardStatus.COMPLETE:
            skipped.append(shard_id)
        else:
            todo.append((url, shard_id))
    return todo, skipped
