"""Per-shard manifests, written last: a shard is complete only if its manifest matches its files
and belongs to the folder's settings."""
import json
from dataclasses import dataclass
from enum import Enum

import pyarrow.parquet as pq

from encoder_service.options import VERIFY
from encoder_service.shards import layout
from encoder_service.storage import join, retry, sha256_of


class ShardStatus(str, Enum):
    COMPLETE = "complete"   # manifest present and matching: skip on the next run
    PARTIAL = "partial"     # files without a (valid) manifest, or other settings: redo the whole shard
    MISSING = "missing"     # nothing written yet


@dataclass(frozen=True)
class Verdict:
    status: ShardStatus
    reason: str = ""
    manifest: dict | None = None


def read_manifest(fs, root: str, shard_id: str) -> dict | None:
    """The manifest, None if there is none, {} if it cannot be parsed."""
    try:
        return json.loads(retry(lambda: fs.cat_file(join(root, layout.manifest_name(shard_id)))))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def shard_status(fs, root: str, shard_id: str, settings: str | None = None, verify: str = "size") -> Verdict:
    """Is the shard done? settings: the folder's fingerprint (None: any); verify: "size" (byte size
    and the row count in the Parquet footer, cheap) or "checksum" (also re-hash the files)."""
    manifest = read_manifest(fs, root, shard_id)
    if manifest is None:
        partial = fs.exists(join(root, layout.errors_name(shard_id))) or fs.glob(
            join(root, layout.data_prefix(shard_id)) + "*.parquet")
        return Verdict(ShardStatus.PARTIAL if partial else ShardStatus.MISSING, "no manifest")
    if settings is not None and manifest.get("settings") != settings:
        return Verdict(ShardStatus.PARTIAL, "written with other settings", manifest)
    problem = check_files(fs, root, manifest, verify)
    return Verdict(ShardStatus.PARTIAL, problem, manifest) if problem else Verdict(ShardStatus.COMPLETE, "", manifest)


def manifest_files(manifest: dict) -> list[dict]:
    """Every file a manifest lists: the data files, then the ledger."""
    return list(manifest.get("files", [])) + ([manifest["errors"]] if "errors" in manifest else [])


def check_files(fs, root: str, manifest: dict, verify: str) -> str:
    """An empty string if the files match the manifest, else what is wrong."""
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {', '.join(VERIFY)}, got {verify!r}")
    if not manifest or "errors" not in manifest:
        return "manifest unreadable"
    for entry in manifest_files(manifest):
        path = join(root, entry["name"])
        try:
            size = fs.size(path)
        except FileNotFoundError:
            return f"{entry['name']} missing"
        if size != entry["bytes"]:
            return f"{entry['name']} has {size} bytes, manifest says {entry['bytes']}"
        with fs.open(path, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        if rows != entry["rows"]:
            return f"{entry['name']} has {rows} rows, manifest says {entry['rows']}"
        if verify == "checksum" and sha256_of(fs, path) != entry["sha256"]:
            return f"{entry['name']} checksum differs from the manifest"
    return ""


def list_manifests(fs, root: str) -> list[str]:
    """Shard ids with a manifest in the folder."""
    pattern = join(root, layout.MANIFESTS) + "/*.json"
    return sorted(p.rsplit("/", 1)[1][:-len(".json")] for p in fs.glob(pattern))
