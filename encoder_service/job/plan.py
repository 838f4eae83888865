"""Everything decided before Ray starts: the inputs exist and are tar shards, the checkpoint loads,
the folder's lease is ours, the folder belongs to these settings, and which shards are left to do.
A mistake here is a JobError: one line, exit 2, nothing started.

Planning costs listings, not requests per shard: the folder's committed shards come from the
folder index (shards/index.py), the inputs' identities from one listing per input folder (by the
longest common prefix of the names asked for there), so a night over 10^6 shards of which most
are done costs a few thousand requests. A shard is encoded when it is new, incomplete, made with
other settings, or its input changed since it was committed (size and ETag or mtime differ; with
--input-identity sha256, also the content's hash). Data files are re-checked only under
--verify-existing.
"""
import json
import os
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from encoder_service.ingest.inputs import expand_inputs, input_identities
from encoder_service.ingest.tar_stream import shard_id_of
from encoder_service.job.config import PIPELINE_VERSION, JobConfig, fingerprint
from encoder_service.model.checkpoint import CheckpointError, sha256_file
from encoder_service.model.wfvae import check_weights_fit, resolve_checkpoint
from encoder_service.options import precision
from encoder_service.records import FolderTotals, InputIdentity, RunMeta
from encoder_service.shards import index as folder_index
from encoder_service.shards import layout, totals
from encoder_service.shards.lease import Lease, LeaseError
from encoder_service.shards.manifest import ManifestUnreadable, check_files, read_manifest
from encoder_service.shards.writer import put_small
from encoder_service.storage import StorageOptions, filesystem, is_local, join, list_prefix, scrub, sha256_of

_THREADS = 16  # concurrent requests where a request per shard is asked for (--verify-existing, sha256)


class JobError(Exception):
    """A mistake in the options or paths, found before any work: printed as one line, exit 2."""


@dataclass(frozen=True)
class Pending:
    """What the commit of a shard to encode needs to know from planning."""
    input: InputIdentity | None     # recorded in its manifest
    replaces: bool                  # the folder may hold a manifest of it: the commit replaces its files


@dataclass
class Plan:
    inputs: int                             # input shards named
    todo: list[tuple[str, str]]             # (url, shard id) to encode now
    pending: dict[str, Pending]             # shard id -> what its commit needs
    skipped: int                            # shards already complete
    why: Counter                            # todo shards by reason: new, changed, incomplete, settings, overwrite
    settings: dict                          # the latent-affecting settings
    fingerprint: str
    run_meta: RunMeta                       # stored with every latent and manifest
    model: object                           # the WFVAEConfig
    root: str                               # the output folder inside its filesystem
    fs: object
    lease: Lease
    index: folder_index.FolderIndex
    base: FolderTotals = field(default_factory=FolderTotals)       # committed shards not redone now
    history: FolderTotals = field(default_factory=FolderTotals)    # every shard committed before the run

    def line(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.why.items()))
        return (f"[plan] {self.inputs} input shards: {len(self.todo)} to encode{f' ({why})' if why else ''}, "
                f"{self.skipped} already complete")


def content_hashes(urls: list[str], storage: StorageOptions | None) -> dict[str, str]:
    """sha256 of each input's bytes (--input-identity sha256): one read of each, concurrently."""
    def one(url):
        fs, path = filesystem(url, storage)
        try:
            return sha256_of(fs, path)
        except FileNotFoundError:
            return None
    with ThreadPoolExecutor(_THREADS) as pool:
        return {u: h for u, h in zip(urls, pool.map(one, urls)) if h}


# ---- the output folder --------------------------------------------------------------------------
def check_output(output: str, storage: StorageOptions | None) -> tuple[object, str]:
    """The output folder can be written: a local path whose nearest existing folder is writable,
    or a store that answers a listing (within the store timeouts). Nothing is written here."""
    try:
        fs, root = filesystem(output, storage)
    except Exception as exc:  # noqa: BLE001 - an unknown protocol, a missing driver: the option's mistake
        raise JobError(f"--output {output}: {type(exc).__name__}: {exc}") from None
    root = root.rstrip("/")
    if is_local(fs):
        _check_local_output(output, Path(root))
        return fs, root
    try:
        next(iter(list_prefix(fs, root, "_")), None)  # one request
    except Exception as exc:  # noqa: BLE001 - unreachable, no credentials, no permission, timeouts
        raise JobError(scrub(f"--output {output}: the store did not answer a listing ({type(exc).__name__}: "
                             f"{exc}); check --s3-endpoint-url, the credentials and the network")) from None
    return fs, root


def _check_local_output(output: str, root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise JobError(f"--output {output} is a file, not a folder")
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        raise JobError(f"--output {output} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise JobError(f"--output {output} cannot be {'written' if existing == root else 'created'}: "
                       f"{existing} is not writable by this user")


def model_identity(cfg: JobConfig):
    """(WFVAEConfig, checkpoint sha256, run metadata): which VAE, which weights, which policy. The
    weights are loaded into the config's model here (on the meta device: no memory for a second
    copy), so a config that does not fit them is one line before Ray starts, never an actor failure."""
    try:
        weights, model = resolve_checkpoint(Path(cfg.checkpoint), cfg.model_config)
        check_weights_fit(weights, model)
    except (CheckpointError, ValueError, OSError) as exc:
        hint = " (pass the --model-config the weights were trained with)" if cfg.model_config else ""
        raise JobError(f"--checkpoint: {exc}{hint}") from None
    digest = sha256_file(weights)
    meta = RunMeta(vae_name=model.name if model.name != "custom" else Path(cfg.checkpoint).name, vae_sha256=digest,
                   precision=precision(cfg.precision).label, pipeline_version=PIPELINE_VERSION,
                   scale=list(model.scale), shift=list(model.shift))
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
        put_small(fs, root, path, json.dumps({"fingerprint": fp, "settings": settings}, indent=1,
                                             sort_keys=True).encode())
    return fp


def _changed(old: InputIdentity | None, now: InputIdentity | None, hashes: dict, url: str) -> bool:
    """Whether an input differs from what its shard was made from. Unknown either way: unchanged
    (folders of schema 2 recorded nothing; an input that vanished fails at ingest if it is redone)."""
    if old is None or now is None or (old.size, old.tag) == (now.size, now.tag):
        return False
    if old.sha256 and url in hashes:
        return hashes[url] != old.sha256
    return True


def classify(urls, ids, identities, index: folder_index.FolderIndex, fp: str, overwrite: bool,
             hashes: dict) -> tuple[list[tuple[str, str]], dict[str, Pending], Counter]:
    """(shards to encode, what their commits need, why each is encoded)."""
    todo, pending, why = [], {}, Counter()
    unreadable = set(index.unreadable)
    for url, sid in zip(urls, ids):
        entry, identity = index.shards.get(sid), identities.get(url)
        if entry is None:
            reason = "incomplete" if sid in unreadable else "new"
        elif overwrite:
            reason = "overwrite"
        elif entry.settings != fp:
            reason = "settings"
        elif _changed(entry.input, identity, hashes, url):
            reason = "changed"
        else:
            continue
        todo.append((url, sid))
        pending[sid] = Pending(_with_hash(identity, hashes.get(url)), replaces=reason != "new")
        why[reason] += 1
    return todo, pending, why


def _with_hash(identity: InputIdentity | None, sha256: str | None) -> InputIdentity | None:
    return InputIdentity(identity.size, identity.tag, sha256) if identity is not None and sha256 else identity


def verify_existing(fs, root: str, shard_ids: list[str], verify: str) -> list[str]:
    """The committed shards whose files do not match their manifests (a request or more per file:
    only on request)."""
    def bad(sid):
        try:
            manifest = read_manifest(fs, root, sid)
        except ManifestUnreadable:
            return True
        return manifest is None or bool(check_files(fs, root, manifest, verify))
    with ThreadPoolExecutor(_THREADS) as pool:
        return [sid for sid, b in zip(shard_ids, pool.map(bad, shard_ids)) if b]


def clean_leftovers(fs, root: str, legacy: bool = False) -> None:
    """What a crashed run left (the lease is ours: no live run owns any of it): staged files,
    temporaries, and the files of commits cut off before their manifest (named by the commit's
    intent), so plain Parquet readers see only committed shards. `legacy`: the folder has no index
    yet (written before schema 3, whose commits left no intent): scan latents/ and errors/ once."""
    staging = join(root, layout.STAGING)
    for path in (fs.find(staging) if fs.exists(staging) else []):
        if path.endswith("/" + layout.COMMIT_INTENT):
            _undo_cut_off_commit(fs, root, json.loads(fs.cat_file(path)))
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    if legacy:
        _clean_legacy(fs, root)


def _undo_cut_off_commit(fs, root: str, intent: dict) -> None:
    if fs.exists(join(root, layout.manifest_name(intent["shard_id"]))):
        return  # the commit finished (its manifest is there); only its staging folder was left
    for name in intent["files"]:
        try:
            fs.rm(join(root, name))
        except FileNotFoundError:
            pass


def _clean_legacy(fs, root: str) -> None:
    if is_local(fs):
        for folder in (layout.LATENTS, layout.ERRORS, layout.MANIFESTS, ""):
            for path in fs.glob(posixpath.join(join(root, folder) if folder else root, "*.tmp-*")):
                fs.rm(path)
    committed = {e.name[:-len(".json")] for e in list_prefix(fs, join(root, layout.MANIFESTS))}
    for folder in (layout.LATENTS, layout.ERRORS):
        for entry in list_prefix(fs, join(root, folder)):
            if entry.name.endswith(".parquet") and layout.shard_of(entry.name) not in committed:
                fs.rm(join(root, folder, entry.name))


# ---- the whole plan -----------------------------------------------------------------------------
def prepare(cfg: JobConfig) -> Plan:
    """Check everything, take the folder's lease and plan the shards; raises JobError (the lease is
    released again). Nothing here needs Ray."""
    if not cfg.input or not cfg.output or not cfg.checkpoint:
        raise JobError("--input, --output and --checkpoint are required (or --demo)")
    storage = cfg.storage()
    urls = expand_inputs(cfg.input, storage)
    fs, root = check_output(cfg.output, storage)
    model, digest, run_meta = model_identity(cfg)
    try:
        lease = Lease.acquire(fs, root, cfg.lease_ttl_s).start_renewing()
    except LeaseError as exc:
        raise JobError(str(exc)) from None
    try:
        return _plan(cfg, storage, urls, fs, root, model, digest, run_meta, lease)
    except BaseException:
        lease.release()
        raise


def _plan(cfg, storage, urls, fs, root, model, digest, run_meta, lease) -> Plan:
    settings = cfg.latent_settings(digest, model.to_dict())
    fp = adopt_settings(fs, root, settings, cfg.overwrite)
    index = folder_index.scan(fs, root)
    legacy = not index.segments
    folder_index.repair(fs, root, index)
    ids = [shard_id_of(u) for u in urls]
    identities = input_identities(urls, storage)
    hashes = {}
    if cfg.input_identity == "sha256":  # hash what is new, or changed by the store's account
        candidates = [u for u, s in zip(urls, ids)
                      if s not in index.shards or _changed(index.shards[s].input, identities.get(u), {}, u)]
        hashes = content_hashes(candidates, storage)
    todo, pending, why = classify(urls, ids, identities, index, fp, cfg.overwrite, hashes)
    if cfg.verify_existing != "none":
        done = [s for s in ids if s not in pending]
        bad = set(verify_existing(fs, root, done, cfg.verify_existing))
        redo = [(u, s) for u, s in zip(urls, ids) if s in bad]
        if cfg.input_identity == "sha256":
            hashes.update(content_hashes([u for u, _ in redo], storage))
        for url, sid in redo:
            todo.append((url, sid))
            pending[sid] = Pending(_with_hash(identities.get(url), hashes.get(url)), replaces=True)
            why["incomplete"] += 1
    complete = len(urls) - len(todo)
    if cfg.max_shards is not None:
        todo = todo[:cfg.max_shards]
        pending = {sid: pending[sid] for _, sid in todo}
    clean_leftovers(fs, root, legacy)
    base, redone = folder_index.folder_totals(fs, root, index, exclude=pending)
    index.shards = {}  # not needed past planning: what the run holds grows with its work, not the folder
    return Plan(len(urls), todo, pending, complete, why, settings, fp,
                RunMeta(**{**run_meta.__dict__, "settings": fp}), model, root, fs, lease, index, base,
                totals.add_totals(base, redone))
