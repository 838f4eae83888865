"""Frame geometry: resize the shorter side, then crop, on uint8 (T, H, W, 3) frames."""
import numpy as np
import torch
import torch.nn.functional as F


def resize_crop_box(src_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Scale that covers out_hw keeping the aspect ratio, and the centred crop box (top, left, h, w)
    in the resized frame."""
    (sh, sw), (oh, ow) = src_hw, out_hw
    scale = max(oh / sh, ow / sw)
    rh, rw = max(oh, round(sh * scale)), max(ow, round(sw * scale))
    return (rh, rw), ((rh - oh) // 2, (rw - ow) // 2, oh, ow)


def resize_and_crop(frames: np.ndarray, out_hw: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """uint8 (T, H, W, 3) -> uint8 (T, out_h, out_w, 3) and the crop box used (in resized pixels)."""
    (rh, rw), box = resize_crop_box(frames.shape[1:3], out_hw)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    if (rh, rw) != frames.shape[1:3]:
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left, h, w = box
    x = x[:, :, top:top + h, left:left + w]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy(), box


def to_model_input(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) or (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]."""
    x = torch.as_tensor(frames)
    if x.ndim == 4:
        x = x.unsqueeze(0)
    return x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
