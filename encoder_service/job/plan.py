"""Everything decided before Ray starts: the inputs exist and are tar shards, the checkpoint loads,
the output folder is usable and belongs to these settings, and which shards are left to do.
A mistake here is a JobError: one line, exit 2, nothing started."""
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from encoder_service.ingest.tar_stream import shard_id_of
from encoder_service.job.config import PIPELINE_VERSION, JobConfig, fingerprint
from encoder_service.model.checkpoint import CheckpointError, sha256_file
from encoder_service.model.wfvae import resolve_checkpoint
from encoder_service.options import precision
from encoder_service.shards import ShardStatus, layout, shard_status
from encoder_service.shards.manifest import list_manifests
from encoder_service.shards.writer import put_bytes
from encoder_service.storage import StorageOptions, filesystem, glob_urls, is_local, join

SHARD_SUFFIXES = (".tar",)


class JobError(Exception):
    """A mistake in the options or paths, found before any work: printed as one line, exit 2."""


@dataclass
class Plan:
    urls: list[str]                         # every input shard
    todo: list[tuple[str, str]]             # (url, shard id) to encode now
    skipped: list[str]                      # shard ids already complete
    settings: dict                          # the latent-affecting settings
    fingerprint: str
    run_meta: dict                          # stored with every latent and manifest
    model: object                           # the WFVAEConfig
    root: str                               # the output folder inside its filesystem
    fs: object
    manifests: dict                         # shard id -> manifest, of the skipped shards
    history: dict                           # shard id -> manifest, of every shard committed before this run


def expand_inputs(patterns: list[str], storage: StorageOptions | None = None) -> list[str]:
    """Brace ranges first, then globs; order kept, duplicates dropped. A glob that matches nothing
    or a name that is not a tar shard is a JobError."""
    urls = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if any(c in url for c in "*?["):
                matched = glob_urls(url, storage)
                if not matched:
                    raise JobError(f"--input {url} matches no file")
                urls += matched
            else:
                urls.append(url)
    for url in urls:
        if not url.endswith(SHARD_SUFFIXES):
            raise JobError(f"--input {url} is not a WebDataset shard (a .tar file); pack videos into tar "
                           "shards, e.g. with webdataset.TarWriter")
    return list(dict.fromkeys(urls))


def check_output(output: str, storage: StorageOptions | None) -> tuple[object, str]:
    fs, root = filesystem(output, storage)
    if is_local(fs) and Path(root).exists() and not Path(root).is_dir():
        raise JobError(f"--output {output} is a file, not a folder")
    return fs, root.rstrip("/")


def model_identity(cfg: JobConfig):
    """(WFVAEConfig, checkpoint sha256, run metadata): which VAE, which weights, which policy."""
    try:
        weights, model = resolve_checkpoint(Path(cfg.checkpoint), cfg.model_config)
    except (CheckpointError, ValueError, OSError) as exc:
        raise JobError(f"--checkpoint: {exc}") from None
    digest = sha256_file(weights)
    meta = {"vae_name": model.name if model.name != "custom" else Path(cfg.checkpoint).name,
            "vae_sha256": digest, "precision": precision(cfg.precision).label,
            "pipeline_version": PIPELINE_VERSION, "scale": json.dumps(model.scale), "shift": json.dumps(model.shift)}
    return model, digest, meta


def adopt_settings(fs, root: str, settings: dict, overwrite: bool) -> str:
    """The folder's settings must be these (or --overwrite makes them so); returns the fingerprint."""
    path = join(root, layout.SETTINGS)
    fp = fingerprint(settings)
    current = json.loads(fs.cat_file(path)) if fs.exists(path) else None
    if current is not None and current["fingerprint"] != fp and not overwrite:
        old = current["settings"]
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        shown = ", ".join(f"{k} {old.get(k)!r} -> {settings.get(k)!r}" for k in changed if k != "model")
        raise JobError(f"--output {root} holds latents made with other settings ({shown or 'model config'}); "
                       "write to a new folder, or pass --overwrite to re-encode everything with these")
    if current is None or current["fingerprint"] != fp:
        fs.makedirs(root, exist_ok=True)
        put_bytes(fs, path, json.dumps({"fingerprint": fp, "settings": settings}, indent=1, sort_keys=True).encode())
    return fp


def plan_shards(urls: list[str], fs, root: str, fp: str, overwrite: bool, verify: str):
    """(shards to run as (url, shard_id), shard ids skipped because complete, their manifests,
    every readable manifest found: the folder's history)."""
    ids = [shard_id_of(u) for u in urls]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise JobError(f"input shards share output names {dupes[:5]}: shard ids come from file names, "
                       "so shards in different folders must have different names")
    todo, skipped, manifests, history = [], [], {}, {}
    for url, shard_id in zip(urls, ids):
        verdict = shard_status(fs, root, shard_id, fp, verify)
        if verdict.manifest:
            history[shard_id] = verdict.manifest
        if verdict.status == ShardStatus.COMPLETE and not overwrite:
            skipped.append(shard_id)
            manifests[shard_id] = verdict.manifest
        else:
            todo.append((url, shard_id))
    return todo, skipped, manifests, history


def clean_leftovers(fs, root: str) -> None:
    """What a crashed run left (one run per folder at a time): staged files, half-published
    temporaries, and data or ledger files of a shard whose commit was cut off before its manifest
    (no manifest at all: the shard is redone whole), so plain Parquet readers see only shards
    that were committed."""
    staging = join(root, layout.STAGING)
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    if is_local(fs):
        for folder in (layout.LATENTS, layout.ERRORS, layout.MANIFESTS, ""):
            for path in fs.glob(posixpath.join(join(root, folder) if folder else root, "*.tmp-*")):
                fs.rm(path)
    committed = set(list_manifests(fs, root))
    for path in fs.glob(join(root, layout.LATENTS) + "/*.parquet") + fs.glob(join(root, layout.ERRORS) + "/*.parquet"):
        if layout.shard_of(path.rsplit("/", 1)[1]) not in committed:
            fs.rm(path)


def prepare(cfg: JobConfig) -> Plan:
    """Check everything and plan the shards; raises JobError. Nothing here needs Ray."""
    if not cfg.input or not cfg.output or not cfg.checkpoint:
        raise JobError("--input, --output and --checkpoint are required (or --demo)")
    storage = StorageOptions(endpoint_url=cfg.s3_endpoint_url)
    urls = expand_inputs(cfg.input, storage)
    fs, root = check_output(cfg.output, storage)
    model, digest, run_meta = model_identity(cfg)
    settings = cfg.latent_settings(digest, model.to_dict())
    fp = adopt_settings(fs, root, settings, cfg.overwrite)
    todo, skipped, manifests, history = plan_shards(urls, fs, root, fp, cfg.overwrite, cfg.verify_existing)
    if cfg.max_shards is not None:
        todo = todo[:cfg.max_shards]
    clean_leftovers(fs, root)
    return Plan(urls, todo, skipped, settings, fp, {**run_meta, "settings": fp}, model, root, fs, manifests, history)
