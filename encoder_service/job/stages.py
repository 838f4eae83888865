"""The encoder stage: EncodeUnits, the encoder actor pool. Each call takes one unit (rows between
stages are records.StageRow, typed Arrow columns; the ingest stage is ingest/stage.py), encodes it,
writes its data file into the output folder and returns a UnitResult; end rows pass through. Only
small records leave an actor, never latents.
"""
import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from encoder_service import metrics
from encoder_service.encode.engine import LatentEncoder
from encoder_service.encode.qa import QualityCheck
from encoder_service.encode.unit_encoder import UnitEncoder, UnitOutput
from encoder_service.job import faults
from encoder_service.job.config import JobConfig
from encoder_service.records import (
    Clip,
    RunMeta,
    StageRow,
    Unit,
    UnitResult,
    from_dict,
    to_table,
)
from encoder_service.storage import scrub
from encoder_service.table.folder import OutputFolder
from encoder_service.table.writer import UnitWriter


# ---- encode -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder actor is built from (small, picklable): the job's parsed options as they are
    (one definition: job/config.py) and the run's identity the driver planned with."""
    config: JobConfig
    run_meta: RunMeta


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


def checkpoint_state(spec: EncoderSpec) -> tuple[str, dict]:
    """The checkpoint's weights, read once on this node, and checked against the hash the driver
    planned with (a node holding another file under the same path is an error, not other latents)."""
    from pathlib import Path

    from encoder_service.model.checkpoint import read_state_dict, sha256_file
    from encoder_service.model.wfvae import resolve_checkpoint
    weights, _ = resolve_checkpoint(Path(spec.config.checkpoint), spec.config.model_config)
    digest = sha256_file(weights)
    if digest != spec.run_meta.vae_sha256:
        raise RuntimeError(f"{weights} on this node has sha256 {digest[:12]}..., the run planned with "
                           f"{spec.run_meta.vae_sha256[:12]}...: every node must hold the same checkpoint")
    return str(weights), read_state_dict(weights)


def build_unit_encoder(spec: EncoderSpec, device: str, folder: OutputFolder) -> UnitEncoder:
    """What an encoder actor puts each unit through: the model, the QA model, the text encoder and
    the writer into `folder`, from one read of the checkpoint (the model and QA share it). The dry
    run times this same one."""
    cfg, meta = spec.config, spec.run_meta
    _, state = checkpoint_state(spec)
    encoder = LatentEncoder.load(cfg.checkpoint, cfg.model_config, cfg.precision, device, cfg.chunk_frames,
                                 compile=cfg.compile, state=state, sha256=meta.vae_sha256, cuda_graphs=cfg.cuda_graphs)
    qa = QualityCheck(cfg.checkpoint, cfg.model_config, device, cfg.chunk_frames, state,
                      meta.vae_sha256) if cfg.qa_fraction else None
    del state
    text = None
    if cfg.text_encoder:
        from encoder_service.text.encoder import TextEncoder
        text = TextEncoder(cfg.text_encoder, cfg.text_precision, device, cfg.text_max_length)
    return UnitEncoder(encoder, UnitWriter(folder, meta), meta, cfg.batch_size, cfg.store_logvar, qa, cfg.seed,
                       cfg.qa_fraction, text)


class EncodeUnits:
    """map_batches UDF for the actor pool (batch_size=1: one unit per call). Ray runs up to
    UNITS_IN_FLIGHT calls of one actor at once, each in its own thread: encode/unit_encoder.py keeps
    the model calls one at a time and everything else beside them."""

    def __init__(self, spec: EncoderSpec, registry):
        cfg = spec.config
        device = resolve_device(cfg.device)
        if device == "cpu":
            torch.set_num_threads(max(1, round(cfg.encoder_cpus)))
        self.spec, self.registry = spec, registry
        self.units = build_unit_encoder(spec, device, OutputFolder(cfg.output, cfg.storage()))
        metrics.sample_device_utilization(self.units.encoder.device)
        self.injection = faults.Injection.from_env()
        if self.injection:
            self.units.before_write = lambda u: self.injection.before_write(f"{u.shard_id}/{u.index}", registry)
        self.lock = threading.Lock()
        self.calls, self.in_flight, self.idle_since = 0, 0, time.perf_counter()

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.lock:
            self.calls += 1
            call = self.calls
        return to_table([self._row(batch, i, call) for i in range(batch.num_rows)], StageRow)

    def _row(self, batch: pa.Table, i: int, call: int) -> StageRow:
        kind = batch["kind"][i].as_py()
        if kind != "unit":
            return from_dict(StageRow, {**batch.slice(i, 1).to_pylist()[0]})
        unit, frames = unit_and_frames(batch, i)
        key = f"{unit.shard_id}/{unit.index}"
        self._started()
        try:
            if self.injection:
                self.injection.before_call(call, key, self.registry)
                frames = self.injection.frames(unit.clips, frames)
            output = self.units.encode(unit, frames)
        except Exception as exc:  # noqa: BLE001 - the clips' own problems are handled inside: a fault
            output = None
            result = self._fault(unit, key, exc)
        finally:
            self._ended()
        if output is not None:
            result = output.result
            self._report(output, unit)
        return StageRow("result", unit.shard_id, result=result)

    def _started(self) -> None:
        """The encoder waits (is idle) while no unit is in the actor."""
        with self.lock:
            if self.in_flight == 0:
                metrics.inc("wfvae_encoder_wait_seconds", time.perf_counter() - self.idle_since)
            self.in_flight += 1
            metrics.set_gauge("wfvae_encoder_units_in_flight", self.in_flight)

    def _ended(self) -> None:
        with self.lock:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle_since = time.perf_counter()
            metrics.set_gauge("wfvae_encoder_units_in_flight", self.in_flight)

    def _fault(self, unit: Unit, key: str, exc: Exception) -> UnitResult:
        import ray
        attempts = ray.get(self.registry.record.remote(key))
        tries = (f"attempt {attempts} of {faults.MAX_ATTEMPTS}" if attempts < faults.MAX_ATTEMPTS else
                 f"attempt {attempts}, the last: the unit fails and its shard stays uncommitted")
        print(f"[encoder] unit {key}: {type(exc).__name__}: {exc} ({tries})", file=sys.stderr, flush=True)
        if attempts < faults.MAX_ATTEMPTS:
            os._exit(1)  # Ray restarts the actor and retries its units in a fresh process (a fresh CUDA context)
        # the unit fails; should this process be broken for good (a sticky CUDA error), the next unit
        # fails once here too and is retried in a fresh process
        return UnitResult(unit.shard_id, unit.index, len(unit.clips), None, [], 0.0,
                          failure=scrub(f"unit {unit.index} failed {attempts} times: {type(exc).__name__}: {exc}"))

    def _report(self, output: UnitOutput, unit: Unit) -> None:
        result, timing = output.result, output.timing
        metrics.inc("wfvae_encoder_busy_seconds", timing.model)
        metrics.inc("wfvae_encoder_dispatch_seconds", timing.dispatch)
        metrics.inc("wfvae_encoder_critical_host_seconds", timing.critical)
        metrics.inc("wfvae_encoder_finish_seconds", timing.finish)
        if timing.text:
            metrics.inc("wfvae_text_encoder_seconds", timing.text)
        if timing.compile:
            metrics.inc("wfvae_encoder_compile_seconds", timing.compile)
        metrics.observe("wfvae_encode_seconds", timing.model)
        encoded = result.clips - len(result.ledger)
        metrics.inc("wfvae_clips_encoded", encoded)
        metrics.inc("wfvae_frames_encoded", encoded * unit.shape[0])
        device = self.units.encoder.device
        in_use, peak = metrics.device_memory(device)
        metrics.set_gauge("wfvae_encoder_memory_bytes", in_use, device=str(device))
        metrics.set_gauge("wfvae_encoder_memory_peak_bytes", peak, device=str(device))


def unit_and_frames(batch: pa.Table, i: int) -> tuple[Unit, np.ndarray]:
    """Row i's unit record (without its pixels) and its frames as an (N, T, H, W, 3) view of the
    Arrow buffer that holds them: no byte is copied (the frames are only read)."""
    units = batch.column("unit")
    chunk, i = _locate(units, i)
    shape, clips_ = chunk.field("shape")[i].as_py(), chunk.field("clips")[i].as_py()
    clips = [from_dict(Clip, c) for c in clips_]
    column = chunk.field("frames")
    offsets = np.frombuffer(column.buffers()[1], np.int64, count=len(column) + 1, offset=8 * column.offset)
    n = int(offsets[i + 1] - offsets[i])
    frames = np.frombuffer(column.buffers()[2], np.uint8, count=n, offset=int(offsets[i])).reshape(len(clips), *shape)
    return Unit(chunk.field("shard_id")[i].as_py(), chunk.field("index")[i].as_py(), shape, clips, b""), frames


def _locate(column: pa.ChunkedArray, i: int) -> tuple[pa.StructArray, int]:
    for chunk in column.chunks:
        if i < len(chunk):
            return chunk, i
        i -= len(chunk)
    raise IndexError(i)
