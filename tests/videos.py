"""Real encoded test videos, written with PyAV (H.264 unless told otherwise)."""
from pathlib import Path

import numpy as np


def pattern(i: int, h: int, w: int) -> np.ndarray:
    """Frame i of a moving colour pattern (distinct per frame, smooth enough to compress well)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 3 + i * 7) % 256, (yy * 4 + i * 5) % 256, ((xx + yy) * 2 + i) % 256], -1).astype(np.uint8)


def write_video(path: Path, frames: int = 20, h: int = 64, w: int = 80, fps: int = 24, codec: str = "libx264",
                container_format: str | None = None) -> Path:
    import av
    with av.open(str(path), "w", format=container_format) as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width, s.pix_fmt = h, w, "yuv420p"
        s.options = {"crf": "18"} if codec == "libx264" else {}
        for i in range(frames):
            c.mux(s.encode(__import__("av").VideoFrame.from_ndarray(pattern(i, h, w), format="rgb24")))
        c.mux(s.encode())
    return path
