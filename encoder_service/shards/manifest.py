"""Per-shard manifest, written last: a shard is complete only if its manifest matches its files."""
import json
from dataclasses import dataclass
from enum import Enum

import pyarrow.parquet as pq

from encoder_service.storage import join, retry, sha256_of


def part_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


def errors_name(shard_id: str) -> str:
    return f"errors-{shard_id}.parquet"


def manifest_name(shard_id: str) -> str:
    return f"part-{shard_id}.manifest.json"


class ShardStatus(str, Enum):
    COMPLETE = "complete"   # manifest present and matching: skip on the next run
    PARTIAL = "partial"     # files without a (valid) manifest: redo the whole shard
    MISSING = "missing"     # nothing written yet


@dataclass(frozen=True)
class Verdict:
    status: ShardStatus
    reason: str = ""


def read_manifest(fs, directory: str, shard_id: str) -> dict | None:
    path = join(directory, manifest_name(shard_id))
    try:
        return json.loads(retry(lambda: fs.cat_file(path)))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return {}


def shard_status(fs, directory: str, shard_id: str, verify: str = "size") -> Verdict:
    """Is the shard done? verify: "size" (row count from the Parquet footer + byte size, cheap)
    or "checksum" (also re-hash the files)."""
    manifest = read_manifest(fs, directory, shard_id)
    part = join(directory, part_name(shard_id))
    if manifest is None:
        exists = fs.exists(part) or fs.exists(join(directory, errors_name(shard_id)))
        return Verdict(ShardStatus.PARTIAL if exists else ShardStatus.MISSING, "no manifest")
    problem = check_against_manifest(fs, directory, shard_id, manifest, verify)
    return Verdict(ShardStatus.PARTIAL, problem) if problem else Verdict(ShardStatus.COMPLETE)


def check_against_manifest(fs, directory: str, shard_id: str, manifest: dict, verify: str) -> str:
    """An empty string if the files match the manifest, else what is wrong."""
    if not manifest:
        return "manifest unreadable"
    for name, rows_key in ((part_name(shard_id), "rows"), (errors_name(shard_id), "error_rows")):
        entry = manifest.get("files", {}).get(name)
        if entry is None:
            return f"manifest lists no {name}"
        path = join(directory, name)
        try:
            size = fs.size(path)
        except FileNotFoundError:
            return f"{name} missing"
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, manifest says {entry['bytes']}"
        with fs.open(path, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        if rows != manifest[rows_key]:
            return f"{name} has {rows} rows, manifest says {manifest[rows_key]}"
        if verify == "checksum" and sha256_of(fs, path) != entry["sha256"]:
            return f"{name} checksum differs from the manifest"
    return ""
