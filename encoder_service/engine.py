"""LatentEncoder: what an encoder actor holds. Loads a checkpoint once, takes batches of same-shape
uint8 clips, copies them to the device (pinned, asynchronous), encodes with the causal cache,
returns mean and logvar. The frames stay uint8 on the device: the wavelet pyramid kernel maps
[0, 255] -> [-1, 1] as it reads them.

Precision policies are encoder_service.options.PRECISIONS (bf16, fp32 with TF32 off, tf32); the
policy's label is recorded with every latent. The numerics flags (TF32, cuDNN autotuning) are set
around each encode call and restored after it, never left behind in the process.

Errors: a batch the model cannot take (shape, dtype) raises ClipRejected before any device work;
anything raised while computing is a fault of the machine or the code, not of the clip.
"""
import contextlib
import copy
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from encoder_service import options
from encoder_service.model import WFVAE
from encoder_service.model.blocks import SCORE_BYTES
from encoder_service.model.wfvae import check_video

# Encoder activation bytes per input pixel per chunk frame. Measured on CPU with the tensor tracker
# (benchmarks/common.py) for WF-VAE-L in float32, 17x64x64, chunks of 4 and 8: 731 and 564; WF-VAE-S
# 491 and 380. Doubled for cuDNN workspaces and allocator rounding (not measured on a GPU yet).
ACTIVATION_BYTES_PER_PIXEL = {torch.bfloat16: 750, torch.float32: 1500}


class ClipRejected(ValueError):
    """The clips cannot be encoded as given (caused by the input, recorded per clip)."""


@dataclass
class Encoded:
    mean: torch.Tensor    # (B, z, t, h, w) on the CPU, in the storage dtype
    logvar: torch.Tensor
    finite: torch.Tensor  # (B,) bool: False where the encoder produced NaN or inf


class LatentEncoder:
    """chunk_frames: frames per causal-cache chunk (a multiple of 4), None for whole clips, or
    "auto": the largest multiple of 4 whose activations fit in half the free device memory.
    channels_last: keep 3D weights (and so activations) NDHWC, cuDNN's fast layout; on by default
    on CUDA. A model passed in is copied if it must change dtype or layout."""

    def __init__(self, vae: WFVAE, precision: str | options.Precision = "bf16",
                 chunk_frames: int | str | None = 16, channels_last: bool | None = None):
        self.precision = options.precision(precision)
        self.chunk_frames = chunk_frames
        self.device = next(vae.parameters()).device
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        if vae.dtype != self.precision.compute or (self.channels_last and not weights_channels_last(vae)):
            vae = copy.deepcopy(vae).to(dtype=self.precision.compute)
            if self.channels_last:
                to_channels_last_3d(vae)
        self.vae = vae.eval()

    @classmethod
    def load(cls, checkpoint: str, config=None, precision: str = "bf16", device: str | None = None,
             chunk_frames: int | str | None = 16, channels_last: bool | None = None) -> "LatentEncoder":
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        vae = WFVAE.from_pretrained(checkpoint, config=config, dtype=options.precision(precision).compute,
                                    device=device)
        if channels_last if channels_last is not None else device.type == "cuda":
            to_channels_last_3d(vae)  # our own model: change it in place
        return cls(vae, precision, chunk_frames, channels_last)

    @property
    def config(self):
        return self.vae.config

    def chunk_for(self, shape) -> int | None:
        """Frames per chunk for a batch of (B, T, H, W, 3) clips; None = the whole clip at once."""
        b, t, h, w = shape[:4]
        chunk = self.chunk_frames
        if chunk == "auto":
            chunk = auto_chunk_frames(self.device, b * h * w, self.precision.compute)
        return chunk if chunk and t > chunk + 1 else None

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> Encoded:
        """uint8 (B, T, H, W, 3) -> posterior mean and logvar (B, z, t, h, w)."""
        with warnings.catch_warnings():  # frames may be a read-only view of a Ray object: only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            x = torch.as_tensor(frames)
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ClipRejected(f"expected clips as (B, T, H, W, 3) frames, got {tuple(x.shape)}")
        try:
            check_video(x[:0].permute(0, 4, 1, 2, 3), self.precision.compute)
        except ValueError as exc:
            raise ClipRejected(str(exc)) from exc
        if self.device.type == "cuda" and not x.is_cuda:  # pinned pages let the copy run asynchronously
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True).permute(0, 4, 1, 2, 3)  # a view: no copy
        if x.dtype != torch.uint8:  # float frames in [0, 255]
            x = x.to(self.precision.compute).div(127.5).sub(1.0)
        with numerics(self.precision):
            posterior = self.vae.encode(x, chunk_frames=self.chunk_for(frames.shape))
        finite = torch.isfinite(posterior.mean).flatten(1).all(1) & torch.isfinite(posterior.logvar).flatten(1).all(1)
        storage = self.precision.storage
        return Encoded(posterior.mean.to(storage).cpu(), posterior.logvar.to(storage).cpu(), finite.cpu())


@contextlib.contextmanager
def numerics(precision: options.Precision):
    """TF32 as the policy says (off for fp32), cuDNN autotuning on (fixed shapes per bucket), for
    the duration of one call; the previous settings come back after."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = precision.tf32
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False,
                                        allow_tf32=precision.tf32):
            yield
    finally:
        matmul.allow_tf32 = before


def to_channels_last_3d(model: torch.nn.Module) -> None:
    """NDHWC storage for every 5D weight (Module.to(memory_format=) also touches 4D ones and fails)."""
    for p in model.parameters():
        if p.ndim == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)


def weights_channels_last(model: torch.nn.Module) -> bool:
    return all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in model.parameters() if p.ndim == 5)


def auto_chunk_frames(device: torch.device, pixels: int, compute: torch.dtype, fraction: float = 0.5) -> int | None:
    """The largest multiple of 4 frames whose activations (pixels = B*H*W per frame) fit in
    `fraction` of the free memory, after the attention scores (bounded by SCORE_BYTES, whatever the
    resolution: attention is query-blocked); None (whole clips) off CUDA, where memory is not the limit."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    usable = max(0, free * fraction - SCORE_BYTES)
    frames = int(usable / (pixels * ACTIVATION_BYTES_PER_PIXEL[compute]))
    return max(4, frames // 4 * 4)
