"""--dry-run N: encode N clips on this machine, measure both sides, and say what to provision."""
import time

from encoder_service.engine import LatentEncoder
from encoder_service.ingest.clips import IngestConfig, ingest_shard
from encoder_service.job.config import JobConfig
from encoder_service.job.plan import expand_inputs
from encoder_service.storage import StorageOptions


def dry_run(cfg: JobConfig) -> dict:
    storage = StorageOptions(endpoint_url=cfg.s3_endpoint_url)
    urls = expand_inputs(cfg.input, storage)
    ingest = IngestConfig(cfg.sampling(), cfg.decoder, storage)
    clips, samples_errors, shards_read, whole_shards, start = [], 0, 0, 0, time.perf_counter()
    for url in urls:
        shards_read += 1
        for kind, record in ingest_shard(url, ingest):
            if kind == "clip":
                clips.append(record)
            else:
                samples_errors += 1
            if len(clips) >= cfg.dry_run:
                break
        else:
            whole_shards += 1
            continue
        break
    decode_s = time.perf_counter() - start
    if not clips:
        raise SystemExit(f"dry run: no usable clip in {shards_read} shard(s) ({samples_errors} errors)")
    encoder = LatentEncoder.load(cfg.checkpoint, cfg.model_config, cfg.precision,
                                 "cuda" if cfg.num_gpus > 0 else "cpu", cfg.chunk_frames)
    by_shape = {}
    for c in clips:
        by_shape.setdefault(c["frames"].shape, []).append(c["frames"])
    import numpy as np
    encoder.encode(np.stack(next(iter(by_shape.values()))[:1]))  # warm-up
    start = time.perf_counter()
    for frames in by_shape.values():
        for i in range(0, len(frames), cfg.batch_size):
            encoder.encode(np.stack(frames[i:i + cfg.batch_size]))
    encode_s = time.perf_counter() - start
    return report(cfg, urls, clips, decode_s, encode_s, whole_shards)


def report(cfg, urls, clips, decode_s, encode_s, whole_shards) -> dict:
    n = len(clips)
    frames = sum(len(c["frame_indices"]) for c in clips)
    decode_per_clip, encode_per_clip = decode_s / n, encode_s / n
    cpus_per_device = decode_per_clip / encode_per_clip
    clips_per_shard = n / max(1, whole_shards) if whole_shards else None
    device = "GPU" if cfg.num_gpus > 0 else "CPU encoder"
    out = {"clips": n, "decode_frames_per_s_per_cpu": frames / decode_s, "decode_clips_per_s_per_cpu": n / decode_s,
           "encode_clips_per_s_per_device": n / encode_s, "cpus_per_encoder_device": cpus_per_device,
           "input_shards": len(urls)}
    print(f"[dry-run] {n} clips: decode {out['decode_frames_per_s_per_cpu']:.1f} frames/s per CPU "
          f"({out['decode_clips_per_s_per_cpu']:.2f} clips/s), encode {out['encode_clips_per_s_per_device']:.2f} "
          f"clips/s per {device}")
    print(f"[dry-run] provision >= {cpus_per_device:.1f} decode CPUs per {device} to keep it busy; "
          f"with {cfg.ingest_cpus:g} CPU(s) per ingest task that is {cpus_per_device / cfg.ingest_cpus:.1f} tasks")
    if clips_per_shard:
        total = clips_per_shard * len(urls)
        out.update(projected_clips=total, projected_device_hours=total * encode_per_clip / 3600)
        print(f"[dry-run] ~{clips_per_shard:.0f} clips per shard x {len(urls)} shards = {total:.0f} clips: "
              f"{out['projected_device_hours']:.2f} {device}-hours of encoding")
    else:
        print("[dry-run] the first shard was not read to its end: raise N to project the total")
    return out
