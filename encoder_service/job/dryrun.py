"""--dry-run N: ingest and encode N clips on this machine, measure both sides, say what to provision.

Decoding runs exactly as an ingest task does (encoder_service.ingest, one decoder thread per
--ingest-cpus), so "decode frames/s per CPU" is the figure to provision ingest CPUs by; the clips
are then encoded through the encoder actor's own unit path (encode/unit_encoder.py: model calls,
statistics, rows, a zstd Parquet file and its checksum, into a temporary folder), so the encode
rate includes the host work an actor does per unit, UNITS_IN_FLIGHT units at once as in the actor.
The projection counts only shards read to their end; "this machine ... clips/s" is what the run
record's clips_per_s_encoding measures (from the first model call), for one encoder here."""
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from encoder_service.encode.unit_encoder import UNITS_IN_FLIGHT
from encoder_service.ingest.clips import IngestConfig, IngestedClip, ingest_shard
from encoder_service.ingest.inputs import expand_inputs
from encoder_service.ingest.units import UnitBuilder, UnitPlan
from encoder_service.job.config import JobConfig
from encoder_service.job.plan import JobError, model_identity
from encoder_service.job.stages import EncoderSpec, build_unit_encoder
from encoder_service.table.folder import OutputFolder


def dry_run(cfg: JobConfig) -> dict:
    storage = cfg.storage()
    urls = expand_inputs(cfg.input, storage)
    model, _, run_meta = model_identity(cfg)
    ingest = IngestConfig(cfg.sampling(), cfg.decoder, storage, threads=max(1, round(cfg.ingest_cpus)))
    clips, errors, whole_shards, whole_clips = [], 0, 0, 0
    start, cpu = time.perf_counter(), time.process_time()
    for url in urls:
        for item in ingest_shard(url, ingest):
            if isinstance(item, IngestedClip):
                clips.append(item)
            else:
                errors += 1
            if len(clips) >= cfg.dry_run:
                break
        else:
            whole_shards, whole_clips = whole_shards + 1, len(clips)
            continue
        break
    decode_s, decode_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    if not clips:
        raise JobError(f"dry run: no usable clip in the input ({errors} ledger rows)")
    encode_s, encode_cpu_s = _encode(EncoderSpec(cfg, run_meta), clips)
    out = report(cfg, urls, clips, decode_s, encode_s, whole_shards, whole_clips, model)
    out.update(here(cfg, len(clips), out, decode_cpu_s + encode_cpu_s))
    return out


def _encode(spec: EncoderSpec, clips: list[IngestedClip]) -> tuple[float, float]:
    """Seconds to encode the clips as the encoder actor does: units per shard, UNITS_IN_FLIGHT of them
    at once through the actor's own UnitEncoder (model calls one at a time, the rest beside them, the
    QA sample and text embeddings included), on a CPU encoder with the actor's --encoder-cpus
    threads: (wall, process CPU) seconds."""
    on_gpu, threads = _on_gpu(spec.config), torch.get_num_threads()
    if not on_gpu:
        torch.set_num_threads(max(1, round(spec.config.encoder_cpus)))
    try:
        return _encode_units(spec, clips, "cuda" if on_gpu else "cpu")
    finally:
        torch.set_num_threads(threads)


def _encode_units(spec: EncoderSpec, clips: list[IngestedClip], device: str) -> tuple[float, float]:
    cfg = spec.config
    with tempfile.TemporaryDirectory(prefix="wfvae-dry-run-") as folder:
        coder = build_unit_encoder(spec, device, OutputFolder(folder))
        units, frames = _units(cfg, clips, coder.encoder.config.latent_dim)
        coder.encoder.encode(frames[0][:cfg.batch_size])  # warm-up, in the shape the timed calls have
        start, cpu = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(UNITS_IN_FLIGHT) as pool:
            list(pool.map(coder.encode, units, frames))
        return time.perf_counter() - start, time.process_time() - cpu


def _units(cfg: JobConfig, clips: list[IngestedClip], latent_dim: int) -> tuple[list, list[np.ndarray]]:
    """The clips as the ingest stage groups them: units per shard, each with its frames array."""
    plan, builders, units = UnitPlan.for_job(cfg, latent_dim), {}, []
    for item in clips:
        shard = item.clip.key.split("/")[0]
        builder = builders.setdefault(shard, UnitBuilder(shard, plan))
        units += [row.unit for row in builder.add(item.clip, item.frames)]
    units += [row.unit for b in builders.values() for row in b.flush()]
    return units, [np.frombuffer(u.frames, np.uint8).reshape(len(u.clips), *u.shape) for u in units]


def here(cfg: JobConfig, n: int, out: dict, cpu_s: float) -> dict:
    """The rate one encoder on this machine reaches once running (what the run record's
    clips_per_s_encoding measures): the least of the encoder's own rate, what the CPUs left to
    ingest decode, and what the machine's cores can do when decoding and encoding share them."""
    cores = os.cpu_count() or 1
    ingest_cpus = max(1.0, cores - (0 if _on_gpu(cfg) else cfg.encoder_cpus))
    bounds = {"encode": out["encode_clips_per_s_per_device"], "decode": out["decode_clips_per_s_per_cpu"] * ingest_cpus,
              "cores": cores * n / max(cpu_s, 1e-9)}
    bound = min(bounds, key=bounds.get)
    device = "GPU" if _on_gpu(cfg) else "CPU encoder"
    print(f"[dry-run] this machine ({cores} cores, one {device}): ~{bounds[bound]:.2f} clips/s once running "
          f"({bound}-bound; the run record's clips_per_s_encoding)")
    return {"projected_clips_per_s_here": bounds[bound], "bound_here": bound, "cpu_seconds_per_clip": cpu_s / n}


def _on_gpu(cfg: JobConfig) -> bool:
    """Whether the dry run encodes on the GPU: --num-gpus > 0 (or not given and CUDA here), not --device cpu."""
    gpus = cfg.num_gpus if cfg.num_gpus is not None else int(torch.cuda.is_available())
    return gpus > 0 and cfg.device != "cpu"


def report(cfg, urls, clips, decode_s, encode_s, whole_shards, whole_clips, model) -> dict:
    n = len(clips)
    frames = sum(len(c.clip.frame_indices) for c in clips)
    cpus = max(1, round(cfg.ingest_cpus))
    per_cpu = frames / decode_s / cpus
    cpus_per_device = (decode_s / n) * cpus / (encode_s / n)
    device = "GPU" if _on_gpu(cfg) else "CPU encoder"
    out = {"clips": n, "decode_frames_per_s_per_cpu": per_cpu, "decode_clips_per_s_per_cpu": n / decode_s / cpus,
           "encode_clips_per_s_per_device": n / encode_s, "cpus_per_encoder_device": cpus_per_device,
           "input_shards": len(urls)}
    print(f"[dry-run] {n} clips: decode {per_cpu:.1f} frames/s per CPU ({out['decode_clips_per_s_per_cpu']:.2f} "
          f"clips/s), encode {out['encode_clips_per_s_per_device']:.2f} clips/s per {device}")
    print(f"[dry-run] provision >= {cpus_per_device:.1f} ingest CPUs per {device} to keep it busy: "
          f"{cpus_per_device / cfg.ingest_cpus:.1f} ingest tasks of --ingest-cpus {cfg.ingest_cpus:g} "
          f"(Ray runs one task per {cfg.ingest_cpus:g} free CPU(s))")
    if whole_shards:
        total = whole_clips / whole_shards * len(urls)
        out.update(projected_clips=total, projected_device_hours=total * encode_s / n / 3600)
        print(f"[dry-run] ~{whole_clips / whole_shards:.0f} clips per shard x {len(urls)} shards = {total:.0f} clips: "
              f"{out['projected_device_hours']:.2f} {device}-hours of encoding")
    else:
        print("[dry-run] the first shard was not read to its end: raise N to project the total")
    return out

