"""Run the job: plan shards, stream them through Ray Data, commit each shard when it is complete.

    shards -> map_batches(IngestShards)            CPU tasks, streaming, one shard per call
           -> map_batches(EncodeClips, ActorPool)  one actor per GPU (or CPU actors), fixed pool
           -> driver: gather rows per shard; when a shard's end marker and all its clips are in,
              write part/errors Parquet and commit the manifest (exactly once per shard)
"""
import json
import time
from pathlib import Path
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import ray

from encoder_service import metrics
from encoder_service.ingest.clips import IngestConfig
from encoder_service.job.config import PIPELINE_VERSION, JobConfig, to_json
from encoder_service.job.plan import expand_inputs, plan_shards
from encoder_service.job.stages import EncodeClips, ingest_shards
from encoder_service.model.checkpoint import sha256_file
from encoder_service.model.wfvae import resolve_checkpoint
from encoder_service.shards import ShardWriter
from encoder_service.storage import StorageOptions, filesystem, join


@dataclass
class ShardRows:
    latents: dict = field(default_factory=dict)   # key -> row (dict keyed: a retried batch cannot duplicate)
    errors: dict = field(default_factory=dict)
    expected_clips: int | None = None
    encode_errors: int = 0

    def complete(self) -> bool:
        return self.expected_clips is not None and len(self.latents) + self.encode_errors == self.expected_clips


@dataclass
class Progress:
    total_shards: int
    started: float = field(default_factory=time.time)
    shards_done: int = 0
    clips: int = 0
    latents: int = 0
    errors: Counter = field(default_factory=Counter)
    encode_seconds: float = 0.0       # summed over actors: time spent inside the encoder
    first_latent: float | None = None
    last_print: float = 0.0

    def eta_s(self) -> float | None:
        if not self.shards_done:
            return None
        return (time.time() - self.started) / self.shards_done * (self.total_shards - self.shards_done)

    def report(self) -> None:
        metrics.set_gauge("wfvae_job_progress_ratio", self.shards_done / self.total_shards if self.total_shards else 1.0)
        if self.eta_s() is not None:
            metrics.set_gauge("wfvae_job_eta_seconds", self.eta_s())

    def line(self) -> str:
        elapsed = time.time() - self.started
        rate = self.latents / elapsed if elapsed else 0.0
        left = self.total_shards - self.shards_done
        eta = f"{self.eta_s():.0f}s" if self.shards_done else "unknown"
        return (f"[encode] {self.shards_done}/{self.total_shards} shards, {self.latents} latents, "
                f"{sum(self.errors.values())} errors, {rate:.2f} clips/s, ETA {eta if left else '0s'}")


def model_identity(cfg: JobConfig) -> dict:
    """The run-level metadata stored with every latent: which VAE, which weights, which options."""
    weights, model_cfg = resolve_checkpoint(Path(cfg.checkpoint), cfg.model_config)
    meta = {"vae_name": model_cfg.name if model_cfg.name != "custom" else Path(cfg.checkpoint).name,
            "vae_sha256": sha256_file(weights), "precision": cfg.precision, "pipeline_version": PIPELINE_VERSION,
            "config_hash": cfg.fingerprint(), "scale": json.dumps(model_cfg.scale), "shift": json.dumps(model_cfg.shift)}
    return meta


def build_dataset(cfg: JobConfig, todo: list[tuple[str, str]], storage: StorageOptions):
    from ray.data import ActorPoolStrategy
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    # an encoder batch travels as one block: keep Ray from splitting it (a 512x512 33-frame clip is 26 MB)
    ctx.target_max_block_size = max(ctx.target_max_block_size or 0, cfg.batch_size * 64 << 20)
    ingest = IngestConfig(cfg.sampling(), cfg.decoder, storage)
    ds = ray.data.from_items([{"url": u, "shard_id": s} for u, s in todo], override_num_blocks=max(1, len(todo)))
    ds = ds.map_batches(ingest_shards, fn_kwargs={"cfg": ingest, "batch_size": cfg.batch_size}, batch_size=1,
                        batch_format="pyarrow", num_cpus=cfg.ingest_cpus)
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    # Ray Data restarts dead pool actors and retries their batches without limit by default
    # (max_restarts=-1, max_task_retries=-1); the driver keys rows by clip, so a retry cannot duplicate.
    return ds.map_batches(
        EncodeClips, batch_size=None, batch_format="pyarrow",  # one ingest block = one encoder batch
        fn_constructor_args=(cfg.checkpoint, cfg.model_config, cfg.precision, device, cfg.batch_size,
                             cfg.chunk_frames, cfg.store_logvar, cfg.inject_fault),
        compute=ActorPoolStrategy(size=cfg.actors()), num_gpus=1 if cfg.num_gpus > 0 else 0,
        num_cpus=1)


def latent_row(row: dict, run_meta: dict) -> dict:
    rec = json.loads(row["record"])
    return {**{k: rec[k] for k in ("key", "source_url", "source_key", "clip_index", "frame_indices", "src_fps",
                                   "clip_fps", "src_hw", "crop_box", "bucket", "metadata", "latent_shape",
                                   "latent_dtype")},
            "mean": row["mean"], "logvar": row["logvar"] or None, "vae_name": run_meta["vae_name"],
            "vae_sha256": run_meta["vae_sha256"], "scale": json.loads(run_meta["scale"]),
            "shift": json.loads(run_meta["shift"]), "precision": run_meta["precision"],
            "pipeline_version": run_meta["pipeline_version"]}


def consume(ds, writer: ShardWriter, run_meta: dict, progress: Progress, every_s: float) -> dict[str, ShardRows]:
    """Gather encoded rows per shard and commit each shard as soon as all its rows are in."""
    pending: dict[str, ShardRows] = defaultdict(ShardRows)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            shard = pending[row["shard_id"]]
            if row["kind"] == "latent":
                if row["key"] not in shard.latents:
                    progress.encode_seconds += json.loads(row["record"])["encode_s"]
                    progress.first_latent = progress.first_latent or time.time()
                shard.latents[row["key"]] = latent_row(row, run_meta)
            elif row["kind"] == "error":
                rec = json.loads(row["record"])
                if row["key"] not in shard.errors:
                    shard.encode_errors += rec["stage"] == "encode"
                    progress.errors[f"{rec['stage']}/{rec['reason']}"] += 1
                    metrics.inc("wfvae_errors", stage=rec["stage"], reason=rec["reason"])
                shard.errors[row["key"]] = rec
            elif row["kind"] == "end":
                shard.expected_clips = json.loads(row["record"])["clips"]
            if shard.complete():
                commit(writer, row["shard_id"], shard, progress)
                del pending[row["shard_id"]]
        if time.time() - progress.last_print >= every_s:
            print(progress.line(), flush=True)
            progress.last_print = time.time()
    return pending


def commit(writer: ShardWriter, shard_id: str, shard: ShardRows, progress: Progress) -> None:
    start = time.perf_counter()
    writer.write(shard_id, list(shard.latents.values()), list(shard.errors.values()))
    metrics.observe("wfvae_write_seconds", time.perf_counter() - start)
    progress.shards_done += 1
    progress.clips += shard.expected_clips
    progress.latents += len(shard.latents)
    metrics.inc("wfvae_shards", status="done")
    metrics.inc("wfvae_latents_written", len(shard.latents))
    metrics.inc("wfvae_latent_bytes_written", sum(len(r["mean"]) + len(r["logvar"] or b"")
                                                  for r in shard.latents.values()))
    progress.report()


def run_job(cfg: JobConfig) -> dict:
    """Run the job; the outcome is counted in `wfvae_job_runs_total`, then the driver lingers so
    Ray's metrics agent (which pushes every few seconds) exports the last values."""
    _check(cfg)
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, ignore_reinit_error=True, log_to_driver=True)
    outcome = "failed"
    try:
        summary = _run(cfg)
        outcome = "failed" if summary["shards_failed"] else "succeeded"
        return summary
    finally:
        metrics.inc("wfvae_job_runs", outcome=outcome)
        time.sleep(cfg.metrics_linger_s)


def _run(cfg: JobConfig) -> dict:
    storage = StorageOptions(endpoint_url=cfg.s3_endpoint_url)
    run_meta = model_identity(cfg)
    urls = expand_inputs(cfg.input, storage)
    todo, skipped = plan_shards(urls, cfg.output, storage, cfg.overwrite, cfg.verify_existing)
    if cfg.max_shards is not None:
        todo = todo[:cfg.max_shards]
    print(f"[plan] {len(urls)} input shards: {len(todo)} to encode, {len(skipped)} already complete", flush=True)
    fs, out = filesystem(cfg.output, storage)
    progress = Progress(total_shards=len(todo))
    metrics.inc("wfvae_shards", len(skipped), status="skipped")
    metrics.set_gauge("wfvae_job_shards_planned", len(todo))
    progress.report()
    failed = []
    if todo:
        writer = ShardWriter(fs, out, run_meta)
        leftover = consume(build_dataset(cfg, todo, storage), writer, run_meta, progress, cfg.progress_every_s)
        failed = sorted(leftover)
        metrics.inc("wfvae_shards", len(failed), status="failed")
    summary = _summary(cfg, urls, todo, skipped, failed, progress, run_meta)
    _write_summary(fs, out, summary)
    print(progress.line(), flush=True)
    print("[summary] " + json.dumps({k: summary[k] for k in ("shards_done", "shards_skipped", "shards_failed",
                                                             "clips", "latents", "errors", "clips_per_s")}), flush=True)
    return summary


def _check(cfg: JobConfig) -> None:
    if not cfg.input or not cfg.output or not cfg.checkpoint:
        raise SystemExit("--input, --output and --checkpoint are required (or --demo)")
    if cfg.precision not in ("bf16", "fp32"):
        raise SystemExit(f"--precision must be bf16 or fp32, got {cfg.precision}")
    cfg.sampling()  # validates frames, size, buckets, clip mode


def _summary(cfg, urls, todo, skipped, failed, progress, run_meta) -> dict:
    elapsed = time.time() - progress.started
    return {"inputs": len(urls), "shards_done": progress.shards_done, "shards_skipped": len(skipped),
            "shards_failed": len(failed), "failed_shards": failed, "clips": progress.clips,
            "latents": progress.latents, "errors": sum(progress.errors.values()),
            "errors_by_reason": dict(progress.errors), "seconds": round(elapsed, 2),
            "clips_per_s": round(progress.latents / elapsed, 3) if elapsed else 0.0,
            "encoder_busy_fraction": _busy_fraction(progress, cfg.actors()),
            "run": run_meta, "config": to_json(cfg)}


def _busy_fraction(progress: Progress, actors: int) -> float | None:
    """Encoder time / (actors x wall time since the first latent arrived): 1.0 = never waiting
    for input. Start-up (Ray, model loading, the first decode) is left out."""
    if progress.first_latent is None:
        return None
    wall = max(1e-9, time.time() - progress.first_latent)
    return round(min(1.0, progress.encode_seconds / (actors * wall)), 3)


def _write_summary(fs, out, summary) -> None:
    fs.makedirs(join(out, "_runs"), exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    data = json.dumps(summary, indent=1).encode()
    for name in (f"_runs/summary-{stamp}.json", "summary.json"):
        with fs.open(join(out, name), "wb") as f:
            f.write(data)
