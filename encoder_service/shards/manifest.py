"""Per-shard manifests (records.Manifest), written last: a shard is complete only if its manifest
is there and belongs to the folder's settings (and, with --verify-existing, matches its files).

Manifests of schema 2 (written before the folder index and input identities) are read as they
are: their run metadata held scale and shift as JSON strings, their statistics extra mean/std."""
import json
from dataclasses import dataclass
from enum import Enum

import pyarrow.parquet as pq

from encoder_service.options import VERIFY
from encoder_service.records import Manifest, from_dict
from encoder_service.shards import layout
from encoder_service.storage import join, list_prefix, retry, sha256_of


class ShardStatus(str, Enum):
    COMPLETE = "complete"   # manifest present and matching: skip on the next run
    PARTIAL = "partial"     # files without a (valid) manifest, or other settings: redo the whole shard
    MISSING = "missing"     # nothing written yet


@dataclass(frozen=True)
class Verdict:
    status: ShardStatus
    reason: str = ""
    manifest: Manifest | None = None


class ManifestUnreadable(ValueError):
    """A file under _manifests/ that is not a manifest of ours: the shard counts as not committed."""


def parse_manifest(data: bytes) -> Manifest:
    try:
        raw = json.loads(data)
        if str(raw.get("schema_version")) == "2":
            raw = _from_schema_2(raw)
        return from_dict(Manifest, raw)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestUnreadable(f"not a manifest ({type(exc).__name__}: {exc})") from None


def _from_schema_2(raw: dict) -> dict:
    run = dict(raw["run"])
    for key in ("scale", "shift"):
        run[key] = json.loads(run[key]) if isinstance(run[key], str) else run[key]
    stats = {kind: ({k: s[k] for k in ("count", "sum", "sum_sq")} if s else None)
             for kind, s in (raw.get("stats") or {}).items()}
    return {**raw, "run": run, "input": None, "stats": stats, "settings": raw.get("settings", run.get("settings", ""))}


def read_manifest(fs, root: str, shard_id: str) -> Manifest | None:
    """The manifest, or None if there is none; ManifestUnreadable if it cannot be parsed."""
    try:
        data = retry(lambda: fs.cat_file(join(root, layout.manifest_name(shard_id))))
    except FileNotFoundError:
        return None
    return parse_manifest(data)


def shard_status(fs, root: str, shard_id: str, settings: str | None = None, verify: str = "size") -> Verdict:
    """Is one shard done? (Planning decides for every shard at once from listings: shards/index.py.)
    settings: the folder's fingerprint (None: any); verify: as check_files."""
    try:
        manifest = read_manifest(fs, root, shard_id)
    except ManifestUnreadable:
        return Verdict(ShardStatus.PARTIAL, "manifest unreadable")
    if manifest is None:
        partial = fs.exists(join(root, layout.errors_name(shard_id))) or any(
            True for _ in list_prefix(fs, join(root, layout.LATENTS), layout.data_prefix(shard_id)))
        return Verdict(ShardStatus.PARTIAL if partial else ShardStatus.MISSING, "no manifest")
    if settings is not None and manifest.settings != settings:
        return Verdict(ShardStatus.PARTIAL, "written with other settings", manifest)
    problem = check_files(fs, root, manifest, verify)
    return Verdict(ShardStatus.PARTIAL, problem, manifest) if problem else Verdict(ShardStatus.COMPLETE, "", manifest)


def check_files(fs, root: str, manifest: Manifest, verify: str) -> str:
    """An empty string if the files match the manifest, else what is wrong. verify: "none" (trust
    the manifest), "size" (byte size and the row count in the Parquet footer: a HEAD and a footer
    read per file), "checksum" (also re-hash every byte)."""
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {', '.join(VERIFY)}, got {verify!r}")
    if verify == "none":
        return ""
    for entry in [*manifest.files, manifest.errors]:
        path = join(root, entry.name)
        try:
            size = fs.size(path)
        except FileNotFoundError:
            return f"{entry.name} missing"
        if size != entry.bytes:
            return f"{entry.name} has {size} bytes, manifest says {entry.bytes}"
        with fs.open(path, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        if rows != entry.rows:
            return f"{entry.name} has {rows} rows, manifest says {entry.rows}"
        if verify == "checksum" and sha256_of(fs, path) != entry.sha256:
            return f"{entry.name} checksum differs from the manifest"
    return ""


def list_manifests(fs, root: str) -> list[str]:
    """Shard ids with a manifest in the folder (one listing: a request per 1,000 shards on S3)."""
    return sorted(e.name[:-len(".json")] for e in list_prefix(fs, join(root, layout.MANIFESTS))
                  if e.name.endswith(".json"))
