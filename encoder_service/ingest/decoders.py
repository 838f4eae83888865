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
    """A video that cannot be used; the message names the problem and what to do."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int
    codec: str


class VideoDecoder(Protocol):
    name: str

    def probe(self, path: str | Path) -> VideoInfo: ...

    def frames(self, path: str | Path, indices: list[int]) -> np.ndarray: ...


class PyAVDecoder:
    name = "pyav"

    def probe(self, path):
        import av
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise VideoError(f"{path}: has no video stream (audio-only or not a video)")
                stream = container.streams.video[0]
                n = stream.frames or _count_frames(container, stream)
                fps = float(stream.average_rate or stream.guessed_rate or 0)
                return VideoInfo(n, fps, stream.codec_context.height, stream.codec_context.width,
                                 stream.codec_context.name)
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: not a readable video ({exc})") from exc

    def frames(self, path, indices):
        import av
        wanted, out = set(indices), {}
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        out[i] = frame.to_ndarray(format="rgb24")
                    if i >= max(indices):
                        break
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: decoding failed after {len(out)} frames ({exc})") from exc
        return _gather(path, out, indices)


class DecordDecoder:
    name = "decord"

    def _reader(self, path):
        import decord
        try:
            return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        except (decord.DECORDError, RuntimeError) as exc:
            raise VideoError(f"{path}: not a readable video ({str(exc).splitlines()[0][:200]})") from exc

    def probe(self, path):
        reader = self._reader(path)
        h, w = reader[0].shape[:2] if len(reader) else (0, 0)
        return VideoInfo(len(reader), float(reader.get_avg_fps()), h, w, "unknown")

    def frames(self, path, indices):
        import decord
        reader = self._reader(path)
        try:
            return reader.get_batch(list(indices)).asnumpy()
        except (decord.DECORDError, RuntimeError, IndexError) as exc:
            raise VideoError(f"{path}: decoding frames {indices[0]}..{indices[-1]} failed "
                             f"({str(exc).splitlines()[0][:200]})") from exc


def _count_frames(container, stream) -> int:
    n = sum(1 for _ in container.demux(stream) if _.size)
    container.seek(0)
    return n


def _gather(path, decoded: dict[int, np.ndarray], indices) -> np.ndarray:
    missing = [i for i in indices if i not in decoded]
    if missing:
        raise VideoError(f"{path}: frames {missing[:5]} could not be decoded (video shorter than its header says, "
                         "or truncated)")
    return np.stack([decoded[i] for i in indices])


DECODERS = {"decord": DecordDecoder, "pyav": PyAVDecoder}


def get_decoder(name: str) -> VideoDecoder:
    if name not in DECODERS:
        raise ValueError(f"unknown video decoder {name!r}; choose one of {', '.join(DECODERS)}")
    return DECODERS[name]()
