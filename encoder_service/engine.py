"""LatentEncoder: what an encoder actor holds. Loads a checkpoint once, takes batches of same-shape
uint8 clips, copies them to the device (pinned, asynchronous), encodes with the causal cache,
returns mean and logvar. The frames stay uint8 on the device: the wavelet pyramid kernel maps
[0, 255] -> [-1, 1] as it reads them.

Precision policies (recorded with every latent):
* "fp32": float32 weights and activations; latents stored as float32.
* "bf16": bfloat16 weights and activations with float32 LayerNorm statistics; latents stored as
  bfloat16.
"""
from dataclasses import dataclass

import numpy as np
import torch

from encoder_service.model import WFVAE

PRECISIONS = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16)}
POLICY_NAMES = {"fp32": "fp32", "bf16": "bf16-weights-activations_fp32-norm-stats"}
# Encoder activation bytes per input pixel per chunk frame. Measured on CPU with the tensor tracker
# (benchmarks/common.py) for WF-VAE-L in float32, 17x64x64, chunks of 4 and 8: 731 and 564; WF-VAE-S
# 491 and 380. Doubled for cuDNN workspaces and allocator rounding (not measured on a GPU yet).
ACTIVATION_BYTES_PER_PIXEL = {"bf16": 750, "fp32": 1500}


@dataclass
class Encoded:
    mean: torch.Tensor    # (B, z, t, h, w) on the CPU, in the storage dtype
    logvar: torch.Tensor
    finite: torch.Tensor  # (B,) bool: False where the encoder produced NaN or inf


class LatentEncoder:
    """chunk_frames: frames per causal-cache chunk (a multiple of 4), None for whole clips, or
    "auto": the largest multiple of 4 whose activations fit in half the free device memory.
    channels_last: keep 3D activations NDHWC (cuDNN's fast bf16 kernels); on by default on CUDA."""

    def __init__(self, vae: WFVAE, precision: str = "bf16", chunk_frames: int | str | None = 16,
                 channels_last: bool | None = None):
        self.compute_dtype, self.storage_dtype = dtypes(precision)
        self.precision, self.policy, self.chunk_frames = precision, POLICY_NAMES[precision], chunk_frames
        self.vae = vae.to(dtype=self.compute_dtype).eval()
        self.device = next(vae.parameters()).device
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        if self.channels_last:
            to_channels_last_3d(self.vae)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes per bucket: autotune once

    @classmethod
    def load(cls, checkpoint: str, config=None, precision: str = "bf16", device: str | None = None,
             chunk_frames: int | str | None = 16, channels_last: bool | None = None) -> "LatentEncoder":
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        vae = WFVAE.from_pretrained(checkpoint, config=config, dtype=dtypes(precision)[0], device=device)
        return cls(vae, precision, chunk_frames, channels_last)

    @property
    def config(self):
        return self.vae.config

    def chunk_for(self, shape) -> int | None:
        """Frames per chunk for a batch of (B, T, H, W, 3) clips; None = the whole clip at once."""
        b, t, h, w = shape[:4]
        chunk = self.chunk_frames
        if chunk == "auto":
            chunk = auto_chunk_frames(self.device, b * h * w, self.precision)
        return chunk if chunk and t > chunk + 1 else None

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> Encoded:
        """uint8 (B, T, H, W, 3) -> posterior mean and logvar (B, z, t, h, w)."""
        x = torch.as_tensor(frames)
        if self.device.type == "cuda" and not x.is_cuda:  # pinned pages let the copy run asynchronously
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True).permute(0, 4, 1, 2, 3)  # a view: no copy
        if x.dtype != torch.uint8:  # float frames in [0, 255]
            x = x.to(self.compute_dtype).div(127.5).sub(1.0)
        posterior = self.vae.encode(x, chunk_frames=self.chunk_for(frames.shape))
        finite = torch.isfinite(posterior.mean).flatten(1).all(1) & torch.isfinite(posterior.logvar).flatten(1).all(1)
        return Encoded(posterior.mean.to(self.storage_dtype).cpu(), posterior.logvar.to(self.storage_dtype).cpu(),
                       finite.cpu())


def dtypes(precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(compute, storage) dtypes of a precision policy."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def to_channels_last_3d(model: torch.nn.Module) -> None:
    """NDHWC storage for every 5D weight (Module.to(memory_format=) also touches 4D ones and fails)."""
    for p in model.parameters():
        if p.ndim == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)


def auto_chunk_frames(device: torch.device, pixels: int, precision: str, fraction: float = 0.5) -> int | None:
    """The largest multiple of 4 frames whose activations (pixels = B*H*W per frame) fit in
    `fraction` of the free memory; None (whole clips) off CUDA, where memory is not the limit."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    frames = int(free * fraction / (pixels * ACTIVATION_BYTES_PER_PIXEL[precision]))
    return max(4, frames // 4 * 4)
