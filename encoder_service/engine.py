"""LatentEncoder: what an encoder actor holds. Loads a checkpoint once, takes batches of same-shape
uint8 clips, normalises them on the device, encodes with the causal cache, returns mean and logvar.

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


@dataclass
class Encoded:
    mean: torch.Tensor    # (B, z, t, h, w) on the CPU, in the storage dtype
    logvar: torch.Tensor
    finite: torch.Tensor  # (B,) bool: False where the encoder produced NaN or inf


class LatentEncoder:
    def __init__(self, checkpoint: str, config=None, precision: str = "bf16", device: str | None = None,
                 chunk_frames: int | None = 16):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.compute_dtype, self.storage_dtype = PRECISIONS[precision]
        self.precision, self.policy, self.chunk_frames = precision, POLICY_NAMES[precision], chunk_frames
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes per bucket: autotune once
        self.vae = WFVAE.from_pretrained(checkpoint, config=config, dtype=self.compute_dtype, device=self.device)

    @property
    def config(self):
        return self.vae.config

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> Encoded:
        """uint8 (B, T, H, W, 3) -> posterior mean and logvar (B, z, t, h, w)."""
        x = torch.as_tensor(frames)
        if self.device.type == "cuda":  # pinned pages let the copy run asynchronously
            x = x.pin_memory()
        # uint8 stays uint8 on the device: the wavelet pyramid maps [0, 255] -> [-1, 1] as it reads
        x = x.to(self.device, non_blocking=True).permute(0, 4, 1, 2, 3)
        if x.dtype != torch.uint8:  # float frames in [0, 255]
            x = x.to(self.compute_dtype).div(127.5).sub(1.0)
        chunk = self.chunk_frames if self.chunk_frames and x.shape[2] > self.chunk_frames + 1 else None
        posterior = self.vae.encode(x, chunk_frames=chunk)
        finite = torch.isfinite(posterior.mean).flatten(1).all(1) & torch.isfinite(posterior.logvar).flatten(1).all(1)
        return Encoded(posterior.mean.to(self.storage_dtype).cpu(), posterior.logvar.to(self.storage_dtype).cpu(),
                       finite.cpu())
