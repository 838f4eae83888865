"""One unit through the encoder, with the device's time spent on model calls only.

A unit (the clips of one shard and shape, one data file) goes through three steps:

    prepare   its frames, a zero-copy view of the Ray object, checked and copied to the device
              (a reused pinned buffer and a side stream on CUDA)
    model     the encoder, holding `device`: the only step that needs the GPU, one at a time
    finish    latents to the host (queued right after the model, into pinned memory), statistics
              (computed on the device in float32 with the latents), rows, the Parquet file,
              its checksum and upload, and the QA sample

Several units are in an encoder actor at once (EncodeUnits runs UNITS_IN_FLIGHT calls
concurrently): while one holds the device, the next prepares and the previous finishes, so the
GPU waits for none of the host work. Backpressure: one unit may finish at a time (`writing`),
and at most UNITS_IN_FLIGHT units' frames are held. A unit is returned only once its file is
durable in latents/ (not yet in the table); an exception in any step fails the unit exactly as a model
fault does.

benchmarks/bench_actor.py uses this class as the actor does; it knows nothing of Ray.
"""
import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from encoder_service.encode.engine import ClipRejected, Encoded, wait
from encoder_service.encode.qa import selected
from encoder_service.options import dtype_name
from encoder_service.records import ChannelStats, Clip, LatentRow, LedgerRow, RunMeta, Unit, UnitResult
from encoder_service.table.schema import encode_tensor
from encoder_service.text.encoder import caption_of

UNITS_IN_FLIGHT = 3  # one preparing, one on the device, one finishing (QA may hold it a while longer)


@dataclass
class Timing:
    """Where one unit's time went, in seconds."""
    model: float = 0.0        # the device's time in model calls (CUDA events on a GPU, wall time on the
    #                           CPU; a stand-in's stated device time)
    dispatch: float = 0.0     # host CPU time of the model calls' thread (Python, dispatch, launches): near
    #                           `model`, the device waits for the host (launch-bound)
    finish_cpu: float = 0.0   # CPU time of the finishing thread (rows, file, checksum; not QA)
    critical: float = 0.0     # host work while holding the device, outside the model calls
    waiting: float = 0.0      # waiting for the device (another unit's model call)
    finish: float = 0.0       # off the device: rows, statistics, file, QA
    compile: float = 0.0      # torch.compile for a new shape (inside a model call; not counted in model)
    text: float = 0.0         # the text encoder on the unit's captions (beside the model; in finish)
    first_model: float | None = None   # perf_counter() as its first model call began ...
    started_at: float | None = None    # ... and the wall clock then (comparable across processes)
    last_model: float | None = None    # ... and as its last one ended


@dataclass
class UnitOutput:
    result: UnitResult
    timing: Timing = field(default_factory=Timing)


class UnitEncoder:
    def __init__(self, encoder, writer, run_meta: RunMeta, batch_size: int, store_logvar: bool,
                 qa=None, qa_seed: int = 0, qa_fraction: float = 0.0, text=None):
        self.encoder, self.writer, self.run_meta, self.text = encoder, writer, run_meta, text
        self.batch_size, self.store_logvar = batch_size, store_logvar
        self.qa, self.qa_seed, self.qa_fraction = qa, qa_seed, qa_fraction
        self.device = threading.Lock()      # the GPU: one model call at a time
        self.writing = threading.Semaphore(1)
        self.before_write = None            # test fault injection: called with the unit before its file

    def encode(self, unit: Unit, frames: np.ndarray) -> UnitOutput:
        timing = Timing()
        batches, ledger = self._model(unit, frames, timing)
        start, cpu = time.perf_counter(), time.thread_time()
        with self.writing:
            result, good = self._finish(unit, batches, ledger, timing)
        timing.finish_cpu = time.thread_time() - cpu
        result = dataclasses.replace(result, qa=self._quality(unit, frames, good))  # off the device's path
        timing.finish = time.perf_counter() - start
        return UnitOutput(result, timing)

    # ---- on the critical path ----------------------------------------------------------------------
    def _model(self, unit: Unit, frames: np.ndarray, timing: Timing):
        """Every batch of the unit through the model; (batches as (first clip, Encoded), ledger)."""
        batches, ledger = [], []
        for lo in range(0, len(unit.clips), self.batch_size):
            try:
                x = self.encoder.to_device(frames[lo:lo + self.batch_size])
            except ClipRejected as exc:  # the clips, not the machine
                ledger += [_ledger(c, "rejected", str(exc)) for c in unit.clips[lo:lo + self.batch_size]]
                continue
            asked = time.perf_counter()
            with self.device:
                got = time.perf_counter()
                if timing.first_model is None:
                    timing.first_model, timing.started_at = got, time.time()
                batches.append((lo, self._timed_forward(x, timing)))
                timing.last_model = time.perf_counter()
                timing.critical += timing.last_model - got
            timing.waiting += got - asked
        timing.critical = max(0.0, timing.critical - timing.model)
        return batches, ledger

    def _timed_forward(self, x: torch.Tensor, timing: Timing) -> Encoded:
        out = self._forward(x, timing)
        timing.compile += out.compile_seconds
        timing.dispatch += out.dispatch_seconds
        return out

    def _forward(self, x: torch.Tensor, timing: Timing) -> Encoded:
        if x.is_cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = self.encoder.forward(x)
            end.record()
            end.synchronize()  # the device is ours until the model is done: its time is what we measure
            timing.model += max(0.0, begin.elapsed_time(end) / 1000 - out.compile_seconds)
        else:
            start = time.perf_counter()
            out = self.encoder.forward(x)
            wall = time.perf_counter() - start - out.compile_seconds
            timing.model += max(0.0, wall if out.device_seconds is None else out.device_seconds)
        return out

    # ---- beside it ---------------------------------------------------------------------------------
    def _finish(self, unit: Unit, batches, ledger: list[LedgerRow], timing: Timing) -> tuple[UnitResult, list]:
        latents, good, sums = [], [], []
        for lo, out in batches:
            wait(out)
            for j in range(len(out.finite)):
                clip = unit.clips[lo + j]
                if not bool(out.finite[j]):
                    ledger.append(_ledger(clip, "non_finite_latent", "the encoder produced NaN/inf latents; the "
                                          "clip was not written (check the source video and the checkpoint)"))
                    continue
                latents.append(latent_row(clip, out.mean[j], out.logvar[j] if self.store_logvar else None,
                                          self.run_meta))
                good.append((lo + j, out.mean[j], out.logvar[j]))
                sums.append((out.sums[j], out.mean[j][0].numel()))
        latents, missing = self._with_text(latents, timing)
        if self.before_write is not None:
            self.before_write(unit)
        file = self.writer.write(unit.shard_id, unit.index, latents) if latents else None
        mean_stats, logvar_stats = channel_stats(sums)
        return UnitResult(unit.shard_id, unit.index, len(unit.clips), file, ledger, timing.model,
                          mean_stats=mean_stats, logvar_stats=logvar_stats, compile_seconds=timing.compile,
                          text_seconds=timing.text, captions_missing=missing, started_at=timing.started_at), good

    def _with_text(self, rows: list[LatentRow], timing: Timing) -> tuple[list[LatentRow], int]:
        """Rows with their captions' text embeddings (each distinct caption encoded once), and how
        many rows have no caption (their embedding columns stay null)."""
        missing = sum(1 for r in rows if r.caption is None)
        if self.text is None or not rows:
            return rows, missing
        start = time.perf_counter()
        embedded = self.text.encode([r.caption for r in rows if r.caption is not None])
        timing.text += time.perf_counter() - start
        return [with_embedding(r, embedded[r.caption]) if r.caption is not None else r for r in rows], missing

    def _quality(self, unit: Unit, frames: np.ndarray, good: list) -> list:
        sample = [g for g in good if selected(unit.clips[g[0]].key, self.qa_seed, self.qa_fraction)]
        if not self.qa or not sample:
            return []
        positions = [p for p, _, _ in sample]
        return self.qa.check([unit.clips[p] for p in positions], frames[positions], [m for _, m, _ in sample],
                             [v for _, _, v in sample])


def channel_stats(sums: list[tuple[torch.Tensor, int]]) -> tuple[ChannelStats | None, ChannelStats | None]:
    """Per-clip (2, 2, C) float32 sums (mean/logvar x sum/sum of squares) and element counts per
    channel -> the unit's ChannelStats of mean and of logvar (added up in float64)."""
    if not sums:
        return None, None
    total = torch.stack([s for s, _ in sums]).double().sum(0)  # (2, 2, C)
    count = sum(n for _, n in sums)
    channels = total.shape[-1]
    return tuple(ChannelStats([count] * channels, total[k, 0].tolist(), total[k, 1].tolist()) for k in range(2))


def with_embedding(row: LatentRow, e) -> LatentRow:
    """A row with a text_encoder.Embedded; a truncated caption is noted in the row's metadata."""
    metadata = row.metadata
    if e.truncated:
        meta = json.loads(metadata or "null") or {}
        meta.setdefault("notes", []).append(f"caption truncated to {e.tokens} tokens for its text embedding")
        metadata = json.dumps(meta)
    return dataclasses.replace(row, metadata=metadata, text_embedding=encode_tensor(e.values),
                               text_embedding_shape=list(e.values.shape),
                               text_embedding_dtype=dtype_name(e.values.dtype), text_tokens=e.tokens)


def latent_row(clip: Clip, mean: torch.Tensor, logvar: torch.Tensor | None, run_meta: RunMeta) -> LatentRow:
    """The clip's row; its caption is the text its embedding is made of (the span's caption, else the
    sample's txt or JSON caption: text/encoder.py caption_of)."""
    fields = {f.name: getattr(clip, f.name) for f in dataclasses.fields(Clip)}
    fields["caption"] = caption_of(clip)
    return LatentRow(**fields,
                     mean=encode_tensor(mean), logvar=encode_tensor(logvar) if logvar is not None else None,
                     latent_shape=list(mean.shape), latent_dtype=dtype_name(mean.dtype),
                     vae_name=run_meta.vae_name, vae_sha256=run_meta.vae_sha256, scale=list(run_meta.scale),
                     shift=list(run_meta.shift), precision=run_meta.precision,
                     pipeline_version=run_meta.pipeline_version)


def _ledger(clip: Clip, reason: str, message: str) -> LedgerRow:
    return LedgerRow(clip.key, clip.source_url, "encode", reason, f"{clip.key}: {message}")
