"""Video probing and decoding with PyAV (default) or decord, behind one interface.

`probe` reads the container header, the frame timestamps (from the container's index when it
is complete and the rate constant; from the packets otherwise: exact presentation times) and the
display rotation (decoding frame 0 only). A decoder's `clips` then decodes the video once, in
presentation order, and serves every planned clip from that one pass: decode, scale + convert
(ingest/geometry.py), rotate and crop each needed frame straight into the clip's uint8 buffer.
PyAV starts at the keyframe before the first clip (checked against the expected timestamp;
otherwise it decodes from frame 0, which is always right) and checks every decoded frame's real
size against the pixel limit.
"""
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from encoder_service.ingest.geometry import Geometry, display_hw, finish


class VideoError(ValueError):
    """A video that cannot be used; the message names the problem and what to do, `reason` groups it."""

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    height: int                   # as stored
    width: int
    rotation: int                 # counter-clockwise degrees to display: 0, 90, 180, 270
    fps: float
    codec: str
    timestamps: np.ndarray        # presentation time of every frame, seconds from frame 0, sorted
    first_time: float | None      # presentation time of frame 0 in the stream, seconds
    keyframes: tuple[int, ...]    # frame indices decoding may start at (empty: only frame 0)

    @property
    def num_frames(self) -> int:
        return len(self.timestamps)

    @property
    def display_hw(self) -> tuple[int, int]:
        return display_hw((self.height, self.width), self.rotation)


def is_variable_rate(timestamps: np.ndarray, tolerance: float = 0.25) -> bool:
    deltas = np.diff(timestamps)
    if len(deltas) < 2:
        return False
    median = np.median(deltas)
    return bool(median > 0 and np.max(np.abs(deltas - median)) > tolerance * median)


def _open(path):
    import av
    return av.open(str(path), metadata_errors="replace")  # a non-UTF-8 tag is not a broken video


def _video_stream(container, path):
    if not container.streams.video:
        raise VideoError(f"{path}: has no video stream (audio-only or not a video)", "no_video_stream")
    stream = container.streams.video[0]
    if stream.codec_context is None or not stream.codec_context.name:
        raise VideoError(f"{path}: video stream with a codec FFmpeg does not know; re-encode it "
                         "(e.g. H.264)", "unsupported_codec")
    return stream


def _check_pixels(path, width: int, height: int, max_pixels: int | None, where: str = "") -> None:
    if max_pixels and width * height > max_pixels:
        raise VideoError(f"{path}: {width}x{height}{where} is above the {max_pixels}-pixel limit; raise "
                         "--max-pixels or downscale the source", "too_large")


def probe(path: str | Path, max_pixels: int | None = None) -> VideoInfo:
    import av
    try:
        with _open(path) as container:
            stream = _video_stream(container, path)
            h, w = stream.codec_context.height, stream.codec_context.width
            _check_pixels(path, w, h, max_pixels)
            times, keyframes = _times_from_index(stream)
            if times is None:
                times, keyframes = _times_from_packets(container, stream)
                container.seek(0)
            frame = next(container.decode(stream), None)
            if frame is None or not len(times):
                raise VideoError(f"{path}: contains no decodable video frame", "no_frames")
            _check_pixels(path, frame.width, frame.height, max_pixels, " (first frame)")
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            rotation = round(frame.rotation / 90) * 90 % 360
            return VideoInfo(h, w, rotation, fps, stream.codec_context.name, times, frame.time, keyframes)
    except av.FFmpegError as exc:
        raise VideoError(f"{path}: not a readable video ({exc})") from exc


def _times_from_index(stream):
    """Frame times and keyframe indices from the container's index (no packet read), if it lists
    every frame and the rate is constant. The index holds decode times; at a constant rate their
    sorted spacing is the presentation spacing, and a closed-GOP keyframe's decode position is
    its frame index (the seek validates that)."""
    entries = stream.index_entries
    if not entries or len(entries) != stream.frames:
        return None, ()
    tb = float(stream.time_base)
    stamps = np.array([e.timestamp for e in entries], dtype=np.float64)
    times = np.sort(stamps) * tb
    times -= times[0]
    if is_variable_rate(times):
        return None, ()  # exact presentation times matter for VFR: read them from the packets
    return times, tuple(j for j, e in enumerate(entries) if e.is_keyframe)


def _times_from_packets(container, stream):
    """Exact presentation times (and keyframe indices) from every packet's header."""
    pts, key_pts = [], []
    for packet in container.demux(stream):
        if packet.pts is None or not packet.size:
            continue
        pts.append(packet.pts)
        if packet.is_keyframe:
            key_pts.append(packet.pts)
    pts = np.sort(np.array(pts, dtype=np.int64))
    keyframes = tuple(int(i) for i in np.searchsorted(pts, key_pts))
    times = pts.astype(np.float64) * float(stream.time_base)
    return times - (times[0] if len(times) else 0.0), keyframes


class VideoDecoder(Protocol):
    name: str

    def clips(self, path, info: VideoInfo, plans: list[list[int]], geometry: Geometry,
              max_pixels: int | None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (plan index, uint8 frames (T, h, w, 3)) for every plan, in one pass."""


class _Assembler:
    """Which decoded frame goes into which slot of which clip; yields clips as they complete."""

    def __init__(self, plans: list[list[int]], out_hw: tuple[int, int]):
        self.plans, self.out_hw = plans, out_hw
        self.wanted = defaultdict(list)
        for p, plan in enumerate(plans):
            for slot, i in enumerate(plan):
                self.wanted[int(i)].append((p, slot))
        self.first, self.last = min(self.wanted), max(self.wanted)
        self.buffers, self.remaining = {}, [len(plan) for plan in plans]

    def needs(self, index: int) -> bool:
        return index in self.wanted

    def put(self, index: int, image: np.ndarray):
        for p, slot in self.wanted[index]:
            if p not in self.buffers:
                self.buffers[p] = np.empty((len(self.plans[p]), *self.out_hw, 3), np.uint8)
            self.buffers[p][slot] = image
            self.remaining[p] -= 1
            if self.remaining[p] == 0:
                yield p, self.buffers.pop(p)

    def check_complete(self, path, decoded: int):
        missing = [p for p, n in enumerate(self.remaining) if n]
        if missing:
            raise VideoError(f"{path}: only {decoded} frames could be decoded, clip {missing[0]} needs frame "
                             f"{max(self.plans[missing[0]])} (video shorter than its header says, or "
                             "truncated)", "truncated_video")


# libswscale's flags, one definition for every conversion we make (recorded in the folder's settings).
# `accurate_rnd` keeps a frame that needs no scaling off swscale's special YUV->RGB converter, whose
# output depends on the CPU's SIMD (2-3 levels apart between machines, measured) and which
# interpolates chroma differently from the scaling path; `bitexact` asks every SIMD path for the C
# reference's bytes. Scaled frames come out as with plain `bilinear` (measured: identical).
SWS_FLAGS = "bilinear+accurate_rnd+bitexact"


class _Scaler:
    """libavfilter `scale=W:H:flags=SWS_FLAGS` + RGB24, rebuilt if the stream changes size."""

    def __init__(self, scaled_hw: tuple[int, int]):
        self.scaled_hw, self.graph, self.source = scaled_hw, None, None

    def __call__(self, frame) -> np.ndarray:
        import av.filter
        source = (frame.width, frame.height, frame.format.name)
        if source != self.source:
            graph = av.filter.Graph()
            graph.threads = 1
            nodes = [graph.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                                      time_base=frame.time_base),
                     graph.add("scale", f"{self.scaled_hw[1]}:{self.scaled_hw[0]}:flags={SWS_FLAGS}"),
                     graph.add("format", "rgb24"), graph.add("buffersink")]
            graph.link_nodes(*nodes).configure()
            self.graph, self.source = graph, source
        self.graph.push(frame)
        return self.graph.pull().to_ndarray()


class PyAVDecoder:
    name = "pyav"

    def __init__(self, threads: int = 1):
        self.threads = threads

    def clips(self, path, info, plans, geometry, max_pixels):
        import av
        assembler, scale, decoded = _Assembler(plans, geometry.out_hw), _Scaler(geometry.scaled_hw), 0
        try:
            with _open(path) as container:
                stream = container.streams.video[0]
                stream.thread_count = self.threads
                for index, frame in _indexed_frames(container, stream, info, assembler.first):
                    decoded = index + 1
                    _check_pixels(path, frame.width, frame.height, max_pixels, f" at frame {index}")
                    if assembler.needs(index):
                        yield from assembler.put(index, finish(scale(frame), geometry))
                    if index >= assembler.last:
                        break
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: decoding failed after frame {decoded - 1} ({exc})", "decode_failed") from exc
        assembler.check_complete(path, decoded)


def _indexed_frames(container, stream, info: VideoInfo, first: int):
    """(frame index, frame) in presentation order from the keyframe at or before `first`."""
    start = max((k for k in info.keyframes if k <= first), default=0)
    if start > 0 and info.first_time is not None:
        expected = info.first_time + float(info.timestamps[start])
        container.seek(round(expected / float(stream.time_base)), stream=stream, backward=True, any_frame=False)
        frames = container.decode(stream)
        head = next(frames, None)
        tolerance = 0.5 * float(np.median(np.diff(info.timestamps))) if info.num_frames > 1 else 1e-3
        if head is not None and head.time is not None and abs(head.time - expected) <= tolerance:
            yield start, head
            yield from enumerate(frames, start + 1)
            return
        container.seek(0)  # the index did not match the stream: count from frame 0
    yield from enumerate(container.decode(stream))


class DecordDecoder:
    """decord with its in-decoder resize (swscale bilinear + RGB24: the PyAV path's pixels bit for
    bit whenever the frame is scaled). The rest goes to the PyAV path: frames kept at their stored
    size (decord's fixed flags take swscale's CPU-dependent converter there, see SWS_FLAGS),
    streams with a display rotation (decord 0.6.0 garbles them: wrong sizes and pixels, measured),
    and scaled widths whose padded row length is a multiple of the width (e.g. 48 pixels: decord
    then reads the padding as pixels and fails with "DECORDArrayCopyFromTo: The size must exactly
    match"). decord rescales a stream that changes size to the header size internally; only the
    PyAV path sees (and limits) the decoded frames' real size."""
    name = "decord"

    def __init__(self, threads: int = 1):
        self.threads = threads

    def clips(self, path, info, plans, geometry, max_pixels):
        if geometry.rotation or geometry.scaled_hw == (info.height, info.width):
            yield from PyAVDecoder(self.threads).clips(path, info, plans, geometry, max_pixels)
            return
        import decord
        (sh, sw), done = geometry.scaled_hw, 0
        try:
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=self.threads, width=sw, height=sh)
            for p, plan in enumerate(plans):
                batch = reader.get_batch([int(i) for i in plan]).asnumpy()
                yield p, np.stack([finish(image, geometry) for image in batch])
                done = p + 1
        except (decord.DECORDError, RuntimeError, IndexError) as exc:
            if done == 0 and "size must exactly match" in str(exc):
                yield from PyAVDecoder(self.threads).clips(path, info, plans, geometry, max_pixels)
                return
            raise VideoError(f"{path}: decoding clip {done} failed ({_first_line(exc)})", "decode_failed") from exc


def _first_line(exc: Exception) -> str:
    """decord's message without its wall-clock prefix ("[12:34:56] file.cc:171: ..."), so ledger
    messages do not change between runs."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text[:200]


DECODERS = {"pyav": PyAVDecoder, "decord": DecordDecoder}


def get_decoder(name: str, threads: int = 1) -> VideoDecoder:
    if name not in DECODERS:
        raise ValueError(f"unknown video decoder {name!r}; choose one of {', '.join(DECODERS)}")
    return DECODERS[name](threads)
