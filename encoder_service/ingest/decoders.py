"""Decode video frames by exact index with decord or PyAV, behind one interface.

Both backends return uint8 RGB frames (N, H, W, 3) for the requested indices, counted in
presentation order from 0. decord's `seek` snaps to keyframes, so positioning always goes
through `get_batch` (which decodes forward from a keyframe) and PyAV decodes sequentially.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


class VideoError(ValueError):
    """A video that cannot be used; the message names the problem and what to do, `reason` groups it."""

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    height: int
    width: int
    fps: float
    codec: str
    timestamps: np.ndarray  # presentation time of every frame, seconds, sorted

    @property
    def num_frames(self) -> int:
        return len(self.timestamps)


class VideoDecoder(Protocol):
    name: str

    def frames(self, path: str | Path, indices: list[int]) -> np.ndarray: ...


def probe(path: str | Path, max_pixels: int | None = None) -> VideoInfo:
    """Header and frame timestamps from the container, without decoding any frame.

    The resolution is checked against max_pixels before the packets are even read."""
    import av
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: has no video stream (audio-only or not a video)", "no_video_stream")
            stream = container.streams.video[0]
            h, w = stream.codec_context.height, stream.codec_context.width
            if max_pixels and h * w > max_pixels:
                raise VideoError(f"{path}: {w}x{h} is above the {max_pixels}-pixel limit; raise --max-pixels "
                                 "or downscale the source", "too_large")
            pts = [p.pts for p in container.demux(stream) if p.pts is not None and p.size]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            times = np.sort(np.array(pts, dtype=np.float64) * float(stream.time_base or 0))
            return VideoInfo(h, w, fps, stream.codec_context.name, times - (times[0] if len(times) else 0))
    except av.FFmpegError as exc:
        raise VideoError(f"{path}: not a readable video ({exc})") from exc


class PyAVDecoder:
    name = "pyav"

    def frames(self, path, indices):
        import av
        wanted, last, out = set(indices), max(indices), {}
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        out[i] = frame.to_ndarray(format="rgb24")
                    if i >= last:
                        break
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: decoding failed after {len(out)} frames ({exc})", "decode_failed") from exc
        return _gather(path, out, indices)


class DecordDecoder:
    name = "decord"

    def _reader(self, path):
        import decord
        try:
            return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        except (decord.DECORDError, RuntimeError) as exc:
            raise VideoError(f"{path}: not a readable video ({str(exc).splitlines()[0][:200]})") from exc

    def frames(self, path, indices):
        import decord
        reader = self._reader(path)
        try:
            return reader.get_batch(list(indices)).asnumpy()
        except (decord.DECORDError, RuntimeError, IndexError) as exc:
            raise VideoError(f"{path}: decoding frames {indices[0]}..{indices[-1]} failed "
                             f"({str(exc).splitlines()[0][:200]})", "decode_failed") from exc


def _gather(path, decoded: dict[int, np.ndarray], indices) -> np.ndarray:
    missing = [i for i in indices if i not in decoded]
    if missing:
        raise VideoError(f"{path}: frames {missing[:5]} could not be decoded (video shorter than its header says, "
                         "or truncated)", "truncated_video")
    return np.stack([decoded[i] for i in indices])


DECODERS = {"decord": DecordDecoder, "pyav": PyAVDecoder}


def get_decoder(name: str) -> VideoDecoder:
    if name not in DECODERS:
        raise ValueError(f"unknown video decoder {name!r}; choose one of {', '.join(DECODERS)}")
    return DECODERS[name]()
