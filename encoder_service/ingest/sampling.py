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
    spans_field: str = "clips"         # clips "spans": the sample JSON's list of [start, end] spans
    captions_field: str | None = None  # ... and its list of one caption per span

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
        _require_constant_rate(timestamps)
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
        out.append(_shown_at(t, start + np.arange(clip_frames) / cfg.fps).tolist())
    return out


def _shown_at(t: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each target time (the latest one that started by then)."""
    return np.clip(np.searchsorted(t, targets + 1e-6, side="right") - 1, 0, len(t) - 1)


def _require_constant_rate(timestamps: np.ndarray) -> None:
    if is_variable_rate(timestamps):
        raise SampleError("variable_frame_rate", "variable frame rate: frame-stride sampling would warp "
                                                 "time; sample with --fps instead, or re-encode at constant rate")


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


# ---- clips from time spans in the sample's metadata (--clips-per-video spans) ----------------------
@dataclass(frozen=True)
class SpanClip:
    """A clip to take (or, with `problem`, one that cannot be taken). Other modes: span None."""
    index: int                         # the clip index (the span's position in the sample's list)
    span: tuple[float, float] | None   # seconds
    caption: str | None
    frames: list[int] | None = None    # None: the span yields no clip, `problem` says why
    problem: SampleError | None = None


def plan_spans(cfg: SamplingConfig, timestamps: np.ndarray, metadata: dict, clip_frames: int) -> list[SpanClip]:
    """One clip per span of the sample's JSON (`cfg.spans_field`), its frames sampled inside the
    span from its start (by --fps, else every --stride-th frame); a span too short for a clip, or
    outside the video, gets its problem instead. A SampleError when the sample has no usable list."""
    if not cfg.fps:
        _require_constant_rate(timestamps)
    spans = read_spans(metadata, cfg.spans_field)
    captions = read_captions(metadata, cfg.captions_field, len(spans))
    t = timestamps - timestamps[0]
    return [_span_clip(cfg, t, i, span, captions[i], clip_frames) for i, span in enumerate(spans)]


def _span_clip(cfg, t: np.ndarray, i: int, span, caption, clip_frames: int) -> SpanClip:
    start, end = span
    where = f"span {i} [{start:.3f}, {end:.3f}]s"
    if end <= start:
        return SpanClip(i, span, caption, problem=SampleError(
            "bad_spans", f"{where} " + ("is empty" if end == start else "ends before it starts") +
                         ": spans are [start, end] with start < end"))
    if start >= t[-1] + 1e-6:
        return SpanClip(i, span, caption, problem=SampleError(
            "span_outside_video", f"{where} starts after the video ends ({t[-1]:.3f}s)"))
    end = min(end, float(t[-1]))
    if cfg.fps:
        targets = start + np.arange(clip_frames) / cfg.fps
        frames = _shown_at(t, targets)
        enough = targets[-1] <= end + 1e-6
        need = f"{(clip_frames - 1) / cfg.fps:.3f}s"
    else:
        first = int(np.searchsorted(t, start - 1e-6))
        frames = first + np.arange(clip_frames) * cfg.stride
        enough = frames[-1] < len(t) and t[frames[-1]] <= end + 1e-6
        need = f"{(clip_frames - 1) * cfg.stride + 1} frames"
    if not enough:
        return SpanClip(i, span, caption, problem=SampleError(
            "span_too_short", f"{where} (within the video: up to {end:.3f}s) is shorter than a clip "
                              f"({need}); lower --num-frames or --stride, or raise --fps"))
    return SpanClip(i, span, caption, frames=[int(f) for f in frames])


def read_spans(metadata: dict, field_name: str) -> list[tuple[float, float]]:
    """[[start, end], ...] in seconds, numbers or "H:MM:SS.mmm" strings (Panda-70M)."""
    value = metadata.get("json", {}).get(field_name) if isinstance(metadata.get("json"), dict) else None
    if not isinstance(value, list) or not value:
        raise SampleError("no_spans", f"its JSON has no list of spans under {field_name!r} (--spans-field); "
                                      "expected [[start, end], ...] in seconds or \"H:MM:SS.mmm\"")
    spans = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise SampleError("bad_spans", f"span {i} of {field_name!r} is {pair!r}, not [start, end]")
        spans.append((seconds(pair[0], i, field_name), seconds(pair[1], i, field_name)))
    return spans


def read_captions(metadata: dict, field_name: str | None, n: int) -> list[str | None]:
    """One caption per span; a sample without the list keeps its spans, uncaptioned (the run record
    counts rows without a caption: captions_missing). A list that does not fit the spans is an error."""
    value = metadata["json"].get(field_name) if field_name is not None else None
    if value is None:
        return [None] * n
    if not isinstance(value, list) or len(value) != n or not all(isinstance(c, str) for c in value):
        got = f"{len(value)} entries" if isinstance(value, list) else type(value).__name__
        raise SampleError("bad_captions", f"{field_name!r} (--captions-field) must be a list of {n} strings, one "
                                          f"per span; got {got}")
    return value


def seconds(value, i: int, field_name: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    if isinstance(value, str):
        parts = value.strip().split(":")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if 1 <= len(numbers) <= 3 and all(math.isfinite(x) and x >= 0 for x in numbers):
            return sum(x * 60 ** k for k, x in enumerate(reversed(numbers)))
    raise SampleError("bad_spans", f"span {i} of {field_name!r}: {value!r} is not seconds or \"H:MM:SS.mmm\"")
