"""Reading an output folder the way its consumers do, through its Delta tables: the rows, the
committed shards, and a snapshot to compare runs by (the referenced data files' bytes and the shard
records without their commit numbers, which differ between runs)."""
import pyarrow.compute as pc
from deltalake import DeltaTable

from encoder_service.table.folder import Committed, OutputFolder


def latent_rows(out, columns=None, storage=None) -> list[dict]:
    folder = OutputFolder(str(out), storage)
    return DeltaTable(folder.uri(), storage_options=folder.delta_options).to_pyarrow_table(columns=columns).to_pylist()


def committed(out, storage=None) -> Committed:
    folder = OutputFolder(str(out), storage)
    return Committed.read(folder, folder.latents())


def shard_ids(out, storage=None) -> set[str]:
    return set(committed(out, storage).records["shard_id"].to_pylist())


def records(out, storage=None) -> dict[str, dict]:
    """The current record of every committed shard, by shard id, without its commit number."""
    rows = committed(out, storage).records.drop_columns(["commit"]).to_pylist()
    return {r["shard_id"]: r for r in rows}


def ledger_rows(out, storage=None) -> list[dict]:
    return [row for r in records(out, storage).values() for row in r["ledger"]]


def snapshot(out, storage=None) -> dict:
    """What a consumer can see: the referenced data files by path with their bytes, and the records."""
    folder = OutputFolder(str(out), storage)
    files = OutputFolder.files(folder.latents())
    data = {p: folder.fs.cat_file(folder.path(p)) for p in sorted(files["path"].to_pylist())}
    return {"files": data, "records": records(out, storage)}


def duplicate_keys(out, storage=None) -> int:
    keys = [r["key"] for r in latent_rows(out, ["key"], storage)]
    return len(keys) - len(set(keys))


def rows_of(out, shard_id: str, storage=None) -> int:
    folder = OutputFolder(str(out), storage)
    files = OutputFolder.files(folder.latents())
    return int(pc.sum(files.filter(pc.equal(files["shard_id"], shard_id))["rows"]).as_py() or 0)
