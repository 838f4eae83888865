"""Everything decided before Ray starts: the inputs exist and are tar shards, the checkpoint loads,
the folder's lease is ours, the folder belongs to these settings, and which shards are left to do.
A mistake here is a JobError: one line, exit 2, nothing started.

Planning reads logs and listings, not requests per shard: the folder's committed shards come from
its two Delta tables (table/folder.py: each table's last checkpoint and the commits after it), the
inputs' identities from one listing per input folder; the comparison of the two is Arrow joins and
column arithmetic, not a Python loop per shard. A shard is encoded when it is new, not committed
(its record and its latents disagree), made with other settings, or its input changed since it was
committed (size and ETag or mtime differ; with --input-identity sha256, also the content's hash).
Data files are re-checked only under --verify-existing.
"""
import dataclasses
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from encoder_service.ingest.inputs import expand_inputs, input_identities
from encoder_service.ingest.tar_stream import shard_id_of
from encoder_service.job.config import PIPELINE_VERSION, JobConfig, fingerprint
from encoder_service.model.checkpoint import CheckpointError, sha256_file
from encoder_service.model.wfvae import check_weights_fit, resolve_checkpoint
from encoder_service.records import FolderTotals, InputIdentity, RunMeta, ShardRecord
from encoder_service.storage import StorageOptions, filesystem, is_local, scrub, sha256_of
from encoder_service.table import totals
from encoder_service.table.folder import Committed, FolderError, OutputFolder
from encoder_service.table.lease import Lease, LeaseError

_THREADS = 16  # concurrent requests where a request per shard is asked for (--verify-existing, sha256)
# what planning reads of the shard records: not their ledgers and QA rows (the bulk of the table)
PLAN_COLUMNS = [f.name for f in dataclasses.fields(ShardRecord) if f.name not in ("ledger", "qa_rows")]


class JobError(Exception):
    """A mistake in the options or paths, found before any work: printed as one line, exit 2."""


@dataclass(frozen=True)
class Pending:
    """What the commit of a shard to encode needs to know from planning."""
    input: InputIdentity | None     # recorded in its shard record
    old: dict[str, int]             # its data files in the latents table now (path -> bytes): the commit removes them


@dataclass
class Plan:
    inputs: int                             # input shards named
    todo: list[tuple[str, str]]             # (url, shard id) to encode now
    pending: dict[str, Pending]             # shard id -> what its commit needs
    skipped: int                            # shards already complete
    why: Counter                            # todo shards by reason: new, changed, incomplete, settings, overwrite
    settings: dict                          # the latent-affecting settings
    fingerprint: str
    run_meta: RunMeta                       # stored with every latent row and shard record
    model: object                           # the WFVAEConfig
    folder: OutputFolder
    lease: Lease
    latents: DeltaTable                     # the tables as planned: the driver's commits go on from these
    shards: DeltaTable
    base: FolderTotals = field(default_factory=FolderTotals)       # committed shards not redone now
    history: FolderTotals = field(default_factory=FolderTotals)    # every shard committed before the run
    redone: pa.Table | None = None          # the current records of the shards to redo (kept if a redo fails)

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
def check_output(output: str, storage: StorageOptions | None) -> OutputFolder:
    """The output folder can be written: a local path whose nearest existing folder is writable,
    or a store that answers a listing (within the store timeouts); not a folder of an older layout.
    Nothing is written here."""
    try:
        folder = OutputFolder(output, storage)
    except Exception as exc:  # noqa: BLE001 - an unknown protocol, a missing driver: the option's mistake
        raise JobError(f"--output {output}: {type(exc).__name__}: {exc}") from None
    if is_local(folder.fs):
        _check_local_output(output, Path(folder.root))
    else:
        try:
            folder.entries()  # one request, kept for what follows
        except Exception as exc:  # noqa: BLE001 - unreachable, no credentials, no permission, timeouts
            raise JobError(scrub(f"--output {output}: the store did not answer a listing ({type(exc).__name__}: "
                                 f"{exc}); check --s3-endpoint-url, the credentials and the network")) from None
    if folder.is_legacy():
        raise JobError(f"--output {output} was written before output folders became Delta tables; convert it "
                       f"once with: python -m encoder_service migrate {output}")
    return folder


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
                   precision=cfg.precision.label, pipeline_version=PIPELINE_VERSION,
                   scale=list(model.scale), shift=list(model.shift))
    return model, digest, meta


def text_identity(cfg: JobConfig) -> str | None:
    """The text encoder's sha256 (--text-encoder), its folder checked before Ray starts."""
    if not cfg.text_encoder:
        return None
    from encoder_service.text.encoder import TextEncoderError, identity
    try:
        return identity(cfg.text_encoder)
    except (TextEncoderError, OSError) as exc:
        raise JobError(str(exc) if isinstance(exc, TextEncoderError) else f"--text-encoder {cfg.text_encoder}: "
                       f"{exc}") from None


def adopt_settings(folder: OutputFolder, settings: dict, overwrite: bool) -> tuple[str, DeltaTable]:
    """The folder's settings must be these (or --overwrite makes them so): a new folder becomes a
    table with them. Returns the fingerprint and the latents table."""
    fp = fingerprint(settings)
    doc = {"fingerprint": fp, "settings": settings}
    if not folder.is_table():
        folder.create(doc)
    latents = folder.latents()
    current = OutputFolder.settings(latents)
    if current is not None and current.get("fingerprint") != fp and not overwrite:
        old = current.get("settings") or {}
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        shown = ", ".join(f"{k} {old.get(k)!r} -> {settings.get(k)!r}" for k in changed if k != "model")
        raise JobError(f"--output {folder.url} holds latents made with other settings ({shown or 'model config'}); "
                       "write to a new folder, or pass --overwrite to re-encode everything with these")
    if current is None or current.get("fingerprint") != fp:
        OutputFolder.set_settings(latents, doc)
    return fp, latents


def classify(urls: list[str], ids: list[str], identities: dict, committed: Committed, fp: str, overwrite: bool,
             hashes: dict, redo: list[str] = ()) -> tuple[list[int], list[str]]:
    """(positions of the inputs to encode, why each), by Arrow joins: no Python step per committed shard."""
    size = [identities[u].size if u in identities else None for u in urls]
    tag = [identities[u].tag if u in identities else None for u in urls]
    digest = [hashes.get(u) for u in urls]
    inputs = pa.table({"pos": range(len(urls)), "shard_id": ids, "size": pa.array(size, pa.int64()),
                       "tag": pa.array(tag, pa.string()), "sha256": pa.array(digest, pa.string())})
    rec = committed.records
    known = pa.table({"shard_id": rec["shard_id"], "r_settings": rec["settings"],
                      "r_size": pc.struct_field(rec["input"], "size"), "r_tag": pc.struct_field(rec["input"], "tag"),
                      "r_sha256": pc.struct_field(rec["input"], "sha256"), "present": pa.repeat(True, rec.num_rows)})
    t = inputs.join(known, "shard_id", join_type="left outer").sort_by("pos")
    present = pc.fill_null(t["present"], False)
    partial = pc.is_in(t["shard_id"], pa.concat_arrays([committed.disagree.cast(pa.string()),
                                                        committed.files["shard_id"].combine_chunks().cast(pa.string())]))
    changed = _changed(t)
    why = pc.case_when(
        pc.make_struct(pc.invert(present), pc.and_kleene(present, pa.scalar(overwrite)),
                       pc.is_in(t["shard_id"], pa.array(list(redo), pa.string())),
                       pc.and_kleene(present, pc.not_equal(t["r_settings"], fp)), pc.and_kleene(present, changed)),
        pc.if_else(partial, "incomplete", "new"), "overwrite", "redo", "settings", "changed")
    todo = pc.indices_nonzero(pc.is_valid(why))
    return t["pos"].take(todo).to_pylist(), why.take(todo).to_pylist()


def _changed(t: pa.Table) -> pa.ChunkedArray:
    """An input differs from what its shard was made from. Unknown either way (migrated folders of
    schema 2, inputs that cannot be listed): unchanged. Both hashed (sha256): the hashes decide."""
    known = pc.and_kleene(pc.is_valid(t["r_size"]), pc.is_valid(t["size"]))
    differs = pc.or_kleene(pc.not_equal(t["r_size"], t["size"]), pc.not_equal(t["r_tag"], t["tag"]))
    hashed = pc.and_kleene(pc.is_valid(t["r_sha256"]), pc.is_valid(t["sha256"]))
    verdict = pc.if_else(hashed, pc.not_equal(t["r_sha256"], t["sha256"]), differs)
    return pc.fill_null(pc.and_kleene(known, verdict), False)


def _with_hash(identity: InputIdentity | None, sha256: str | None) -> InputIdentity | None:
    return InputIdentity(identity.size, identity.tag, sha256) if identity is not None and sha256 else identity


def verify_existing(folder: OutputFolder, records: pa.Table, verify: str) -> set[str]:
    """The committed shards whose files do not match their records (a request or more per file:
    only on request): size (and with "checksum" the sha256) of each data file."""
    def bad(row):
        for f in row["files"]:
            try:
                if folder.fs.size(folder.path(f["name"])) != f["bytes"]:
                    return True
                if verify == "checksum" and sha256_of(folder.fs, folder.path(f["name"])) != f["sha256"]:
                    return True
            except FileNotFoundError:
                return True
        return False
    rows = records.select(["shard_id", "files"]).to_pylist()
    with ThreadPoolExecutor(_THREADS) as pool:
        return {row["shard_id"] for row, b in zip(rows, pool.map(bad, rows)) if b}


def _old_files(files: pa.Table, shard_ids: list[str]) -> dict[str, dict[str, int]]:
    """The latents table's files of these shards, by shard (O(their files), one Arrow filter)."""
    mine = files.filter(pc.is_in(files["shard_id"], pa.array(shard_ids, pa.string())))
    out: dict[str, dict[str, int]] = {}
    for path, sid, size in zip(mine["path"].to_pylist(), mine["shard_id"].to_pylist(), mine["bytes"].to_pylist()):
        out.setdefault(sid, {})[path] = size
    return out


# ---- the whole plan -----------------------------------------------------------------------------
def prepare(cfg: JobConfig) -> Plan:
    """Check everything, take the folder's lease and plan the shards; raises JobError (the lease is
    released again). Nothing here needs Ray."""
    if not cfg.input or not cfg.output or not cfg.checkpoint:
        raise JobError("--input, --output and --checkpoint are required (or --demo)")
    storage = cfg.storage()
    urls = expand_inputs(cfg.input, storage)
    folder = check_output(cfg.output, storage)
    model, digest, run_meta = model_identity(cfg)
    try:
        lease = Lease.acquire(folder, cfg.lease_ttl_s, breaking=cfg.break_lease).start_renewing()
    except LeaseError as exc:
        raise JobError(str(exc)) from None
    try:
        return _plan(cfg, storage, urls, folder, model, digest, run_meta, lease)
    except FolderError as exc:
        lease.release()
        raise JobError(str(exc)) from None
    except BaseException:
        lease.release()
        raise


def _plan(cfg, storage, urls, folder: OutputFolder, model, digest, run_meta, lease) -> Plan:
    settings = cfg.latent_settings(digest, model.to_dict(), text_identity(cfg))
    fp, latents = adopt_settings(folder, settings, cfg.overwrite)
    shards = folder.shards()
    committed = Committed.read(folder, latents, shards, PLAN_COLUMNS)
    ids = [shard_id_of(u) for u in urls]
    identities = input_identities(urls, storage)
    hashes = {}
    if cfg.input_identity == "sha256":  # every input is hashed: a rewrite with the same size and mtime counts
        hashes = content_hashes(urls, storage)
    positions, reasons = classify(urls, ids, identities, committed, fp, cfg.overwrite, hashes, cfg.redo_shards)
    if cfg.verify_existing != "none":
        chosen = set(positions)
        done = committed.records.filter(pc.is_in(committed.records["shard_id"],
                                                 pa.array([s for i, s in enumerate(ids) if i not in chosen])))
        bad = verify_existing(folder, done, cfg.verify_existing)
        extra = [i for i, s in enumerate(ids) if s in bad and i not in chosen]
        positions, reasons = positions + extra, reasons + ["incomplete"] * len(extra)
    complete = len(urls) - len(positions)
    if cfg.max_shards is not None:
        positions, reasons = positions[:cfg.max_shards], reasons[:cfg.max_shards]
    todo = [(urls[i], ids[i]) for i in positions]
    old = _old_files(committed.files, [sid for _, sid in todo])
    pending = {sid: Pending(_with_hash(identities.get(url), hashes.get(url)), old.get(sid, {})) for url, sid in todo}
    folder.remove_temporaries()
    records = committed.records
    redo = pc.is_in(records["shard_id"], pa.array(list(pending), pa.string())) if records.num_rows else None
    base = totals.records_totals(records.filter(pc.invert(redo)) if redo is not None else records)
    redone = records.filter(redo) if redo is not None else records
    return Plan(len(urls), todo, pending, complete, Counter(reasons), settings, fp,
                RunMeta(**{**run_meta.__dict__, "settings": fp}), model, folder, lease, latents, shards,
                base, totals.add_totals(base, totals.records_totals(redone)), redone)

