"""One shard in, clip records and error records out (the clip record contract of the architecture).

Every sample ends as at least one clip or exactly one error, every clip as a record or an error, so
counts add up: samples = samples with clips + samples with errors.
"""
import json
import os
import time
from dataclasses import dataclass

from encoder_service.ingest.decoders import VideoError, get_decoder, probe
from encoder_service.ingest.sampling import SampleError, SamplingConfig, choose_bucket, plan_clips
from encoder_service.ingest.tar_stream import Sample, ShardReadError, iter_samples, shard_id_of
from encoder_service.ingest.transforms import resize_and_crop
from encoder_service.storage import StorageOptions


@dataclass(frozen=True)
class IngestConfig:
    sampling: SamplingConfig = SamplingConfig()
    decoder: str = "decord"
    storage: StorageOptions | None = None
    spool_dir: str | None = None


def error_record(key: str, url: str, stage: str, reason: str, message: str) -> dict:
    return {"key": key, "source_url": url, "stage": stage, "reason": reason, "message": message}


def ingest_shard(url: str, cfg: IngestConfig):
    """Yield ("clip", record) and ("error", record) pairs for one WebDataset shard."""
    shard_id, decoder = shard_id_of(url), get_decoder(cfg.decoder)
    try:
        for sample in iter_samples(url, cfg.storage, cfg.spool_dir):
            yield from sample_clips(sample, shard_id, url, cfg.sampling, decoder)
    except ShardReadError as exc:
        if exc.partial is not None:
            yield "error", error_record(f"{shard_id}/{exc.partial.key}", url, "read", "truncated_member", str(exc))
        yield "error", error_record(shard_id, url, "read", exc.reason, str(exc))


def sample_clips(sample: Sample, shard_id: str, url: str, cfg: SamplingConfig, decoder):
    key = f"{shard_id}/{sample.key}"
    if sample.video_path is None:
        yield "error", error_record(key, url, "read", "no_video",
                                    f"{url}:{sample.key}: no video member (one of mp4, webm, mkv, avi, mov)")
        return
    where = f"{url}:{sample.video_member}"
    if os.path.getsize(sample.video_path) == 0:
        yield "error", error_record(key, url, "read", "empty", f"{where}: zero bytes; re-export the sample")
        return
    try:
        info = probe(sample.video_path, cfg.max_pixels)
        if info.num_frames == 0:
            raise SampleError("no_frames", "contains no video frames")
        bucket = choose_bucket(cfg, (info.height, info.width))
        plans = plan_clips(cfg, info.num_frames, info.timestamps, key, bucket[0])
    except VideoError as exc:
        yield "error", error_record(key, url, "probe", exc.reason, str(exc).replace(sample.video_path, where))
        return
    except SampleError as exc:
        yield "error", error_record(key, url, "sample", exc.reason, f"{where}: {exc}")
        return
    metadata = json.dumps({**sample.metadata, **({"problems": sample.problems} if sample.problems else {})})
    for i, indices in enumerate(plans):
        start = time.perf_counter()
        try:
            frames = decoder.frames(sample.video_path, indices)
        except VideoError as exc:
            yield "error", error_record(f"{key}/{i}", url, "decode", exc.reason,
                                        str(exc).replace(sample.video_path, where))
            continue
        frames, box = resize_and_crop(frames, bucket[1:])
        decode_s = time.perf_counter() - start
        yield "clip", {"key": f"{key}/{i}", "frames": frames, "source_url": url, "source_key": sample.key,
                       "clip_index": i, "frame_indices": [int(v) for v in indices], "src_fps": info.fps,
                       "clip_fps": cfg.fps or info.fps / cfg.stride, "src_hw": [info.height, info.width],
                       "crop_box": list(box), "bucket": "x".join(map(str, bucket)), "metadata": metadata,
                       "decode_s": decode_s}
