"""How a source frame becomes a clip frame; one definition for both decoders.

1. Scale the frame as stored, with libswscale's bilinear filter (area-aware when downscaling) and
   the conversion to RGB24 in the same pass: the libavfilter `scale=W:H:flags=...` filter with
   decoders.SWS_FLAGS, the same bytes on any CPU. Both decoders give the same pixels.
2. Rotate to the displayed orientation (the container's display matrix).
3. Centre-crop to the clip size.
The scale covers the clip size keeping the displayed aspect ratio.
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    scaled_hw: tuple[int, int]              # size swscale outputs, in the stored orientation
    rotation: int                           # counter-clockwise degrees to display: 0, 90, 180, 270
    crop_box: tuple[int, int, int, int]     # top, left, height, width in the scaled, rotated frame

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.crop_box[2], self.crop_box[3]


def display_hw(stored_hw: tuple[int, int], rotation: int) -> tuple[int, int]:
    return tuple(stored_hw) if rotation % 180 == 0 else (stored_hw[1], stored_hw[0])


def resize_crop_box(src_hw: tuple[int, int], out_hw: tuple[int, int]):
    """Scale that covers out_hw keeping the aspect ratio, and the centred crop box (top, left, h, w)
    in the resized frame."""
    (sh, sw), (oh, ow) = src_hw, out_hw
    scale = max(oh / sh, ow / sw)
    rh, rw = max(oh, round(sh * scale)), max(ow, round(sw * scale))
    return (rh, rw), ((rh - oh) // 2, (rw - ow) // 2, oh, ow)


def plan_geometry(stored_hw: tuple[int, int], rotation: int, out_hw: tuple[int, int]) -> Geometry:
    (rh, rw), box = resize_crop_box(display_hw(stored_hw, rotation), out_hw)
    return Geometry((rh, rw) if rotation % 180 == 0 else (rw, rh), rotation, box)


def finish(scaled_rgb: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(h, w, 3) scaled frame in the stored orientation -> the clip frame (a view)."""
    frame = np.rot90(scaled_rgb, geometry.rotation // 90) if geometry.rotation else scaled_rgb
    top, left, h, w = geometry.crop_box
    return frame[top:top + h, left:left + w]
