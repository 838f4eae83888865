"""Which frames make which clips, and at what size (pure functions, no decoding)."""
import hashlib
import math
import random
from dataclasses import dataclass, field

import numpy as np


class SampleError(ValueError):
    """A video that yields no clip under the sampling options; `reason` groups it in the ledger."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_bucket(text: str) -> tuple[int, int, int]:
    t, h, w = (int(v) for v in text.lower().split("x"))
    if (t - 1) % 4 or h % 8 or w % 8:
        raise ValueError(f"bucket {text}: frames must be 4k+1 and height, width multiples of 8")
    return t, h, w


@dataclass(frozen=True)
class SamplingConfig:
    num_frames: int = 33
    fps: float | None = None           # resample to this rate by timestamp (handles variable frame rate)
    stride: int = 1                    # else take every stride-th frame
    clips: str = "first"               # first | all | uniform:N | random:N
    seed: int = 0
    min_duration: float = 0.0          # seconds; shorter videos are refused
    size: tuple[int, int] | None = (256, 256)
    buckets: tuple[tuple[int, int, int], ...] = field(default=())  # (T, H, W); nearest aspect wins
    max_pixels: int = 3840 * 2160      # refuse larger videos from the header, before decoding

    def __post_init__(self):
        frames = [b[0] for b in self.buckets] or [self.num_frames]
        if any(n < 1 or (n - 1) % 4 for n in frames):
            raise ValueError(f"frames per clip must be 4k+1, got {frames}")
        if not self.buckets and (self.size is None or self.size[0] % 8 or self.size[1] % 8):
            raise ValueError(f"clip size must be multiples of 8, got {self.size}")
        mode = self.clips.split(":")[0]
        if mode not in ("first", "all", "uniform", "random") or (mode in ("uniform", "random") and ":" not in self.clips):
            raise ValueError(f"clips must be first, all, uniform:N or random:N, got {self.clips!r}")


def choose_bucket(cfg: SamplingConfig, src_hw: tuple[int, int]) -> tuple[int, int, int]:
    """The bucket whose aspect ratio is nearest the source's (in log space), or the fixed size."""
    if not cfg.buckets:
        return (cfg.num_frames, *cfg.size)
    aspect = math.log(src_hw[1] / src_hw[0])
    return min(cfg.buckets, key=lambda b: (abs(math.log(b[2] / b[1]) - aspect), -b[1] * b[2]))


def is_variable_rate(timestamps: np.ndarray, tolerance: float = 0.25) -> bool:
    deltas = np.diff(timestamps)
    if len(deltas) < 2:
        return False
    median = np.median(deltas)
    return bool(median > 0 and np.max(np.abs(deltas - median)) > tolerance * median)


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
    mode, _, count = cfg.clips.partition(":")
    if mode == "first":
        return candidates[:1]
    if mode == "all":  # non-overlapping, from the start
        chosen, last_end = [], -1
        for c in candidates:
            if c[0] > last_end:
                chosen.append(c)
                last_end = c[-1]
        return chosen
    n = min(int(count), len(candidates))
    if mode == "uniform":
        return [candidates[round(i * (len(candidates) - 1) / max(1, n - 1))] for i in range(n)] if n > 1 else candidates[:1]
    seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}/{key}".encode()).digest()[:8], "little")
    return [candidates[i] for i in sorted(random.Random(seed).sample(range(len(candidates)), n))]
