"""Which frames make which clips, and at what size (pure functions, no decoding)."""
import hashlib
import math
import random
from dataclasses import dataclass, field

import numpy as np

from encoder_service import options
from encoder_service.ingest.decoders import is_variable_rate


class SampleError(ValueError):
    """A video that yields no clip under the sampling options; `reason` groups it in the ledger."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SamplingConfig:
    num_frames: int = 33
    fps: float | None = None           # resample to this rate by timestamp (handles variable frame rate)
    stride: int = 1                    # else take every stride-th frame
    clips: options.ClipMode = options.ClipMode("first")
    seed: int = 0
    min_duration: float = 0.0          # seconds; shorter videos are refused
    size: tuple[int, int] | None = (256, 256)
    buckets: tuple[tuple[int, int, int], ...] = field(default=())  # (T, H, W); nearest aspect wins
    max_pixels: int = 3840 * 2160      # refuse larger videos from the header, before decoding

    def __post_init__(self):  # values built in code get the same checks as options
        options.frames(self.num_frames)
        for b in self.buckets:
            options.bucket(options.format_dims(b))
        if not self.buckets:
            options.size(options.format_dims(self.size or ()))
        object.__setattr__(self, "clips", options.clip_mode(self.clips))
        if self.stride < 1 or (self.fps is not None and self.fps <= 0):
            raise options.OptionError(f"stride must be >= 1 and fps > 0, got stride {self.stride}, fps {self.fps}")


def choose_bucket(cfg: SamplingConfig, src_hw: tuple[int, int]) -> tuple[int, int, int]:
    """The bucket whose aspect ratio is nearest the source's (in log space), or the fixed size."""
    if not cfg.buckets:
        return (cfg.num_frames, *cfg.size)
    aspect = math.log(src_hw[1] / src_hw[0])
    return min(cfg.buckets, key=lambda b: (abs(math.log(b[2] / b[1]) - aspect), -b[1] * b[2]))


def plan_clips(cfg: SamplingConfig, num_frames: int, timestamps: np.ndarray, key: str,
               clip_frames: int) -> list[list[int]]:
    """Frame indices of every clip to take from a video with `num_frames` frames at `timestamps`
    (seconds, presentation order)."""
    duration = float(timestamps[-1] - timestamps[0]) if len(timestamps) > 1 else 0.0
    if duration < cfg.min_duration:
        raise SampleError("too_short", f"{duration:.2f}s long, under the minimum of {cfg.min_duration}s; "
                                       "lower --min-duration to keep it")
    if cfg.fps:
        candidates = _by_time(cfg, timestamps, clip_frames)
    else:
        if is_variable_rate(timestamps):
            raise SampleError("variable_frame_rate", "variable frame rate: frame-stride sampling would warp "
                                                     "time; sample with --fps instead, or re-encode at constant rate")
        span = (clip_frames - 1) * cfg.stride + 1
        candidates = [list(range(s, s + span, cfg.stride)) for s in range(0, num_frames - span + 1)]
    if not candidates:
        need = f"{(clip_frames - 1) / cfg.fps:.2f}s" if cfg.fps else f"{(clip_frames - 1) * cfg.stride + 1} frames"
        raise SampleError("too_short", f"has {num_frames} frames ({duration:.2f}s), a clip needs {need}; "
                                       "lower --num-frames, --stride or raise --fps")
    return _select(cfg, candidates, key)


def _by_time(cfg, timestamps, clip_frames):
    """Clips on a grid of 1/fps seconds, each frame the latest one shown at that time."""
    t = timestamps - timestamps[0]
    clip_len = (clip_frames - 1) / cfg.fps
    starts = t[t <= t[-1] - clip_len + 1e-6]
    out = []
    for start in starts:
        targets = start + np.arange(clip_frames) / cfg.fps
        out.append(np.clip(np.searchsorted(t, targets + 1e-6, side="right") - 1, 0, len(t) - 1).tolist())
    return out


def _select(cfg, candidates, key):
    mode, count = cfg.clips.kind, cfg.clips.count
    if mode == "first":
        return candidates[:1]
    if mode == "all":  # non-overlapping, from the start
        chosen, last_end = [], -1
        for c in candidates:
            if c[0] > last_end:
                chosen.append(c)
                last_end = c[-1]
        return chosen
    n = min(count, len(candidates))
    if mode == "uniform":
        if n == 1:
            return candidates[:1]
        return [candidates[round(i * (len(candidates) - 1) / (n - 1))] for i in range(n)]
    seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}/{key}".encode()).digest()[:8], "little")
    return [candidates[i] for i in sorted(random.Random(seed).sample(range(len(candidates)), n))]
