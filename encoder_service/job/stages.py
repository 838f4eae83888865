"""The two distributed stages. Rows between them are records.StageRow, typed Arrow columns.

    ingest_shards   CPU tasks, one shard each: clips -> units (job/units.py), then the shard's end
                    row (clip and unit counts, ingest ledger, or why the shard could not be read)
    EncodeUnits     the encoder actor pool: each call takes one unit, encodes it, writes its data
                    file into the output's staging area and returns a UnitResult; end rows pass
                    through. Only small records leave an actor, never latents.
"""
import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from encoder_service import metrics
from encoder_service.engine import ClipRejected, LatentEncoder
from encoder_service.ingest.clips import IngestConfig, IngestedClip, ShardUnavailable, ingest_shard
from encoder_service.job import faults
from encoder_service.job.qa import QualityCheck, selected
from encoder_service.job.units import UnitBuilder, UnitPlan
from encoder_service.options import dtype_name
from encoder_service.records import (
    ChannelStats,
    Clip,
    LatentRow,
    LedgerRow,
    RunMeta,
    ShardEnd,
    StageRow,
    Unit,
    UnitResult,
    from_dict,
    to_table,
)
from encoder_service.shards.schema import encode_tensor
from encoder_service.shards.writer import StagingWriter
from encoder_service.storage import StorageOptions, filesystem, scrub


# ---- ingest -------------------------------------------------------------------------------------
def ingest_shards(shards: pa.Table, cfg: IngestConfig, units: UnitPlan):
    """map_batches UDF (CPU tasks): each input row is one shard; yields one-row tables."""
    for url, shard_id in zip(shards["url"].to_pylist(), shards["shard_id"].to_pylist()):
        for row in shard_rows(url, shard_id, cfg, units):
            yield to_table([row], StageRow)


def shard_rows(url: str, shard_id: str, cfg: IngestConfig, plan: UnitPlan):
    """A shard's unit rows, then its end row. A shard that cannot be read, or a bug in ingest
    itself, is not data: the end row carries the failure and the shard is not committed."""
    builder, ledger, clips, failure = UnitBuilder(shard_id, plan), [], 0, None
    try:
        for item in ingest_shard(url, cfg):
            if isinstance(item, LedgerRow):
                ledger.append(item)
                continue
            _count_decoded(item)
            clips += 1
            yield from builder.add(item.clip, item.frames)
    except ShardUnavailable as exc:
        failure = scrub(str(exc))
    except Exception as exc:  # noqa: BLE001 - per-sample problems are handled inside; this is a bug
        failure = scrub(f"{url}: ingest failed ({type(exc).__name__}: {exc})")
    yield from builder.flush()
    yield StageRow("end", shard_id, end=ShardEnd(shard_id, url, builder.count, clips, ledger, failure))


def _count_decoded(item: IngestedClip) -> None:
    metrics.inc("wfvae_clips_decoded", bucket=item.clip.bucket)
    metrics.inc("wfvae_frames_decoded", item.frames.shape[0])
    metrics.observe("wfvae_decode_seconds", item.decode_seconds)


# ---- encode -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder actor is built from (small, picklable)."""
    checkpoint: str
    model_config: str | None
    precision: str
    device: str                 # auto | cuda | cpu
    cpus: float
    batch_size: int
    chunk_frames: int | str | None
    store_logvar: bool
    output: str
    storage: StorageOptions
    run_meta: RunMeta
    qa_fraction: float = 0.0
    qa_seed: int = 0


def resolve_device(choice: str) -> str:
    """cpu: the CPU, whatever the actor holds. auto: CUDA when Ray gave this actor a GPU, else the
    CPU. A GPU actor without CUDA (auto or cuda) is an error naming the node."""
    import ray
    if choice == "cpu":
        return "cpu"
    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    if choice == "cuda" or gpus:
        if not torch.cuda.is_available():
            raise RuntimeError(f"node {ray.util.get_node_ip_address()}: the encoder actor holds GPU {gpus} but "
                               "torch sees no CUDA device (a CPU build of torch, or no driver); install the CUDA "
                               "build there, or pass --device cpu to encode on the CPU")
        return "cuda"
    return "cpu"


class EncodeUnits:
    """map_batches UDF for the actor pool (batch_size=1: one unit per call)."""

    def __init__(self, spec: EncoderSpec, registry):
        device = resolve_device(spec.device)
        if device == "cpu":
            torch.set_num_threads(max(1, round(spec.cpus)))
        self.spec, self.registry, self.calls = spec, registry, 0
        self.encoder = LatentEncoder.load(spec.checkpoint, spec.model_config, spec.precision, device, spec.chunk_frames)
        fs, root = filesystem(spec.output, spec.storage)
        self.writer = StagingWriter(fs, root, spec.run_meta)
        self.qa = (QualityCheck(spec.checkpoint, spec.model_config, device, spec.chunk_frames)
                   if spec.qa_fraction else None)
        self.injection = faults.Injection.from_env()
        self.last_return = None  # end of the previous call: the gap to the next is time spent waiting

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.last_return is not None:
            metrics.inc("wfvae_encoder_wait_seconds", time.perf_counter() - self.last_return)
        self.calls += 1
        try:
            return to_table([self._row(batch, i) for i in range(batch.num_rows)], StageRow)
        finally:
            self.last_return = time.perf_counter()

    def _row(self, batch: pa.Table, i: int) -> StageRow:
        kind = batch["kind"][i].as_py()
        if kind != "unit":
            return from_dict(StageRow, {**batch.slice(i, 1).to_pylist()[0]})
        unit, frames = unit_and_frames(batch["unit"][i])
        key = f"{unit.shard_id}/{unit.index}"
        try:
            if self.injection:
                self.injection.before_call(self.calls, key, self.registry)
                frames = self.injection.frames(unit.clips, frames)
            result = self.encode_unit(unit, frames)
        except Exception as exc:  # noqa: BLE001 - the clips' own problems are handled inside: a fault
            result = self._fault(unit, key, exc)
        self._report(result, unit)
        return StageRow("result", unit.shard_id, result=result)

    def encode_unit(self, unit: Unit, frames: np.ndarray) -> UnitResult:
        start, spec = time.perf_counter(), self.spec
        latents, ledger, good = [], [], []  # good: (position in the unit, mean, logvar) of each latent
        for lo in range(0, len(unit.clips), spec.batch_size):
            clips = unit.clips[lo:lo + spec.batch_size]
            try:
                out = self.encoder.encode(frames[lo:lo + spec.batch_size])
            except ClipRejected as exc:  # the clips, not the machine
                ledger += [_ledger(clip, "rejected", str(exc)) for clip in clips]
                continue
            for j, clip in enumerate(clips):
                if not bool(out.finite[j]):
                    ledger.append(_ledger(clip, "non_finite_latent", "the encoder produced NaN/inf latents; the "
                                          "clip was not written (check the source video and the checkpoint)"))
                    continue
                latents.append(latent_row(clip, out.mean[j], out.logvar[j] if spec.store_logvar else None,
                                          spec.run_meta))
                good.append((lo + j, out.mean[j], out.logvar[j]))
        file = self.writer.write(unit.shard_id, unit.index, latents) if latents else None
        encode_seconds = time.perf_counter() - start
        return UnitResult(unit.shard_id, unit.index, len(unit.clips), file, ledger, encode_seconds,
                          mean_stats=channel_stats([m for _, m, _ in good]),
                          logvar_stats=channel_stats([v for _, _, v in good]), qa=self._quality(unit, frames, good))

    def _quality(self, unit: Unit, frames: np.ndarray, good: list) -> list:
        sample = [g for g in good if selected(unit.clips[g[0]].key, self.spec.qa_seed, self.spec.qa_fraction)]
        if not self.qa or not sample:
            return []
        positions = [p for p, _, _ in sample]
        return self.qa.check([unit.clips[p] for p in positions], frames[positions], [m for _, m, _ in sample],
                             [v for _, _, v in sample])

    def _fault(self, unit: Unit, key: str, exc: Exception) -> UnitResult:
        import ray
        attempts = ray.get(self.registry.record.remote(key))
        print(f"[encoder] unit {key}: {type(exc).__name__}: {exc} (attempt {attempts} of {faults.MAX_ATTEMPTS})",
              file=sys.stderr, flush=True)
        if attempts < faults.MAX_ATTEMPTS:
            os._exit(1)  # Ray restarts the actor and retries the unit in a fresh process (a fresh CUDA context)
        # the unit fails; should this process be broken for good (a sticky CUDA error), the next unit
        # fails once here too and is retried in a fresh process
        return UnitResult(unit.shard_id, unit.index, len(unit.clips), None, [], 0.0,
                          failure=scrub(f"unit {unit.index} failed {attempts} times: {type(exc).__name__}: {exc}"))

    def _report(self, result: UnitResult, unit: Unit) -> None:
        metrics.inc("wfvae_encoder_busy_seconds", result.encode_seconds)
        metrics.observe("wfvae_encode_seconds", result.encode_seconds)
        encoded = 0 if result.failure else result.clips - len(result.ledger)
        metrics.inc("wfvae_clips_encoded", encoded)
        metrics.inc("wfvae_frames_encoded", encoded * unit.shape[0])
        in_use, peak = metrics.device_memory(self.encoder.device)
        metrics.set_gauge("wfvae_encoder_memory_bytes", in_use, device=str(self.encoder.device))
        metrics.set_gauge("wfvae_encoder_memory_peak_bytes", peak, device=str(self.encoder.device))


def unit_and_frames(scalar) -> tuple[Unit, np.ndarray]:
    """A unit row's record (without its pixels) and its frames as a zero-copy (N, T, H, W, 3) view."""
    shape = scalar["shape"].as_py()
    clips = [from_dict(Clip, c) for c in scalar["clips"].as_py()]
    frames = np.frombuffer(scalar["frames"].as_buffer(), np.uint8).reshape(len(clips), *shape)
    return Unit(scalar["shard_id"].as_py(), scalar["index"].as_py(), shape, clips, b""), frames


def latent_row(clip: Clip, mean: torch.Tensor, logvar: torch.Tensor | None, run_meta: RunMeta) -> LatentRow:
    return LatentRow(**{f.name: getattr(clip, f.name) for f in dataclasses.fields(Clip)},
                     mean=encode_tensor(mean), logvar=encode_tensor(logvar) if logvar is not None else None,
                     latent_shape=list(mean.shape), latent_dtype=dtype_name(mean.dtype),
                     vae_name=run_meta.vae_name, vae_sha256=run_meta.vae_sha256, scale=list(run_meta.scale),
                     shift=list(run_meta.shift), precision=run_meta.precision,
                     pipeline_version=run_meta.pipeline_version)


def channel_stats(tensors: list[torch.Tensor]) -> ChannelStats | None:
    """Per-channel count, sum and sum of squares (float64) of (C, t, h, w) latents."""
    if not tensors:
        return None
    x = torch.stack(tensors).double().transpose(0, 1).flatten(1)  # (C, N)
    return ChannelStats([x.shape[1]] * x.shape[0], x.sum(1).tolist(), (x * x).sum(1).tolist())


def _ledger(clip: Clip, reason: str, message: str) -> LedgerRow:
    return LedgerRow(clip.key, clip.source_url, "encode", reason, f"{clip.key}: {message}")
