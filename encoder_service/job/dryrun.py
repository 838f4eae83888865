"""--dry-run N: ingest and encode N clips on this machine, measure both sides, say what to provision.

Decoding runs exactly as an ingest task does (encoder_service.ingest, one decoder thread per
--ingest-cpus), so "decode frames/s per CPU" is the figure to provision ingest CPUs by; the clips
are then encoded through the encoder actor's own unit path (encode/unit_encoder.py: model calls,
statistics, rows, a zstd Parquet file and its checksum, into a temporary folder), so the encode
rate includes the host work an actor does per unit. The projection counts only shards read to
their end."""
import tempfile
import time

import numpy as np
import torch

from encoder_service.encode.engine import LatentEncoder
from encoder_service.encode.unit_encoder import UnitEncoder
from encoder_service.ingest.clips import IngestConfig, IngestedClip, ingest_shard
from encoder_service.ingest.inputs import expand_inputs
from encoder_service.ingest.units import UnitBuilder, UnitPlan
from encoder_service.job.config import JobConfig
from encoder_service.job.plan import JobError, model_identity
from encoder_service.table.folder import OutputFolder
from encoder_service.table.writer import UnitWriter


def dry_run(cfg: JobConfig) -> dict:
    storage = cfg.storage()
    urls = expand_inputs(cfg.input, storage)
    model, _, _ = model_identity(cfg)
    ingest = IngestConfig(cfg.sampling(), cfg.decoder, storage, threads=max(1, round(cfg.ingest_cpus)))
    clips, errors, whole_shards, whole_clips, start = [], 0, 0, 0, time.perf_counter()
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
    decode_s = time.perf_counter() - start
    if not clips:
        raise JobError(f"dry run: no usable clip in the input ({errors} ledger rows)")
    encode_s = _encode(cfg, clips)
    return report(cfg, urls, clips, decode_s, encode_s, whole_shards, whole_clips, model)


def _encode(cfg: JobConfig, clips: list[IngestedClip]) -> float:
    encoder = LatentEncoder.load(cfg.checkpoint, cfg.model_config, cfg.precision,
                                 "cuda" if _on_gpu(cfg) else "cpu", cfg.chunk_frames)
    builder = UnitBuilder("dry-run", UnitPlan.for_job(cfg, encoder.config.latent_dim))
    units = [row.unit for item in clips for row in builder.add(item.clip, item.frames)] + \
            [row.unit for row in builder.flush()]
    first = np.frombuffer(units[0].frames, np.uint8).reshape(len(units[0].clips), *units[0].shape)
    encoder.encode(first[:1])  # warm-up
    _, _, run_meta = model_identity(cfg)
    with tempfile.TemporaryDirectory(prefix="wfvae-dry-run-") as folder:
        writer = UnitWriter(OutputFolder(folder), run_meta)
        coder = UnitEncoder(encoder, writer, run_meta, cfg.batch_size, cfg.store_logvar)
        start = time.perf_counter()
        for unit in units:
            coder.encode(unit, np.frombuffer(unit.frames, np.uint8).reshape(len(unit.clips), *unit.shape))
        return time.perf_counter() - start


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

