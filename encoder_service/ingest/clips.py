"""One shard in, clips (with their pixels) and ledger rows out.

Per-sample isolation: whatever goes wrong while reading, probing, sampling or decoding one sample
(a VideoError, a SampleError, or any other exception a hostile file provokes in a decoder)
becomes that sample's ledger row, naming the shard and member, and the shard goes on. Only the
shard itself failing to be readable (ShardUnavailable) or the machine running out of memory
escape. Counts add up: every sample ends as clips and/or ledger rows, every member that is not
used as a ledger row.
"""
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from encoder_service.ingest.decoders import VideoError, get_decoder, probe
from encoder_service.ingest.geometry import plan_geometry
from encoder_service.ingest.sampling import SampleError, SamplingConfig, SpanClip, choose_bucket, plan_clips, plan_spans
from encoder_service.ingest.tar_stream import (
    Problem,
    Sample,
    ShardTruncated,
    ShardUnavailable,
    iter_samples,
    shard_id_of,
)
from encoder_service.options import format_dims
from encoder_service.records import Clip, LedgerRow
from encoder_service.storage import StorageOptions, scrub

__all__ = ["IngestConfig", "IngestedClip", "ShardUnavailable", "ingest_shard"]


@dataclass(frozen=True)
class IngestConfig:
    sampling: SamplingConfig = SamplingConfig()
    decoder: str = "pyav"
    storage: StorageOptions | None = None
    spool_dir: str | None = None
    threads: int = 1                  # decoder threads per ingest task


@dataclass(frozen=True)
class IngestedClip:
    clip: Clip
    frames: np.ndarray                # uint8 (T, H, W, 3)
    decode_seconds: float             # this clip's share of its video's decode time


def ingest_shard(url: str, cfg: IngestConfig) -> Iterator[IngestedClip | LedgerRow]:
    """Clips and ledger rows of one WebDataset shard, in shard order. Raises ShardUnavailable.
    The URL is read as given; every row and message names it without credentials (storage.scrub)."""
    shard_id, decoder, shown = shard_id_of(url), get_decoder(cfg.decoder, cfg.threads), scrub(url)
    try:
        for item in iter_samples(url, cfg.storage, cfg.spool_dir):
            if isinstance(item, Problem):
                yield LedgerRow(f"{shard_id}/{item.key}", shown, "read", item.reason, scrub(item.message))
            else:
                yield from _isolated(item, shard_id, shown, cfg.sampling, decoder)
    except ShardTruncated as exc:
        if exc.partial is not None:
            yield LedgerRow(f"{shard_id}/{exc.partial.key}", shown, "read", "truncated_member", scrub(str(exc)))
        yield LedgerRow(shard_id, shown, "read", exc.reason, scrub(str(exc)))


class _Stage:
    """Where a sample is in its handling: an unexpected exception is ledgered under that stage."""
    name = "read"


def _isolated(sample: Sample, shard_id: str, url: str, cfg: SamplingConfig, decoder):
    stage = _Stage()
    try:
        yield from _sample_clips(sample, shard_id, url, cfg, decoder, stage)
    except MemoryError:
        raise  # the machine, not the sample
    except Exception as exc:  # noqa: BLE001 - anything a hostile sample provokes stays with the sample
        where = f"{url}:{sample.video_member or sample.key}"
        text = scrub(str(exc)).replace(sample.video_path or "\0", where)
        yield LedgerRow(f"{shard_id}/{sample.key}", url, stage.name, "unexpected_error",
                        f"{where}: {type(exc).__name__}: {text}")


def _sample_clips(sample: Sample, shard_id: str, url: str, cfg: SamplingConfig, decoder, stage: _Stage):
    key = f"{shard_id}/{sample.key}"
    for problem in sample.problems:
        yield LedgerRow(f"{shard_id}/{problem.key}", url, "read", problem.reason, scrub(problem.message))
    if sample.video_path is None:
        yield LedgerRow(key, url, "read", "no_video", f"{url}:{sample.key}: no video member (one of mp4, webm, "
                        "mkv, avi, mov)")
        return
    where = f"{url}:{sample.video_member}"

    def ledger(k, stage_name, exc):
        return LedgerRow(k, url, stage_name, exc.reason, str(exc).replace(sample.video_path, where))

    if os.path.getsize(sample.video_path) == 0:
        yield LedgerRow(key, url, "read", "empty", f"{where}: zero bytes; re-export the sample")
        return
    stage.name = "probe"
    start = time.perf_counter()
    try:
        info = probe(sample.video_path, cfg.max_pixels)
    except VideoError as exc:
        yield ledger(key, "probe", exc)
        return
    stage.name = "sample"
    try:
        bucket = choose_bucket(cfg, info.display_hw)
        chosen = _choose(cfg, info, sample, key, bucket[0])
    except SampleError as exc:
        yield LedgerRow(key, url, "sample", exc.reason, f"{where}: {exc}")
        return
    for c in chosen:
        if c.problem is not None:  # a span that yields no clip: its own row, the others go on
            yield LedgerRow(f"{key}/{c.index}", url, "sample", c.problem.reason, f"{where}: {c.problem}")
    chosen = [c for c in chosen if c.problem is None]
    if not chosen:
        return
    plans = [c.frames for c in chosen]  # every clip of the video, spans included, in one decoding pass
    stage.name = "decode"
    geometry = plan_geometry((info.height, info.width), info.rotation, bucket[1:])
    metadata = json.dumps({**sample.metadata, **({"notes": sample.notes} if sample.notes else {})})
    done, last = set(), start
    try:
        for i, frames in decoder.clips(sample.video_path, info, plans, geometry, cfg.max_pixels):
            done.add(i)
            now = time.perf_counter()
            c = chosen[i]
            clip = Clip(f"{key}/{c.index}", url, sample.key, c.index, [int(v) for v in plans[i]], info.fps,
                        cfg.fps or info.fps / cfg.stride, list(info.display_hw), info.rotation,
                        list(geometry.crop_box), format_dims(bucket), metadata,
                        list(c.span) if c.span is not None else None, c.caption)
            yield IngestedClip(clip, frames, now - last)
            last = now
    except VideoError as exc:
        for i in range(len(plans)):
            if i not in done:
                yield ledger(f"{key}/{chosen[i].index}", "decode", exc)


def _choose(cfg: SamplingConfig, info, sample: Sample, key: str, clip_frames: int) -> list[SpanClip]:
    if cfg.clips.kind == "spans":
        return plan_spans(cfg, info.timestamps, sample.metadata, clip_frames)
    plans = plan_clips(cfg, info.num_frames, info.timestamps, key, clip_frames)
    return [SpanClip(i, None, None, frames) for i, frames in enumerate(plans)]
