"""The quality check that runs beside production: a seeded sample of clips (--qa-fraction) is
re-encoded in fp32 with TF32 off (drift of the production precision: relative L2 of mean and
logvar) and its stored mean is decoded (fp32, causal-cache chunks) and compared with the clip's
frames (PSNR/SSIM). With random weights (the demo's) the reconstruction only proves the mechanism.
"""
import contextlib
import hashlib

import numpy as np
import torch

from encoder_service.encode.engine import LatentEncoder, numerics
from encoder_service.encode.quality import psnr, ssim
from encoder_service.options import PRECISIONS
from encoder_service.records import Clip, QaRow

DECODE_CHUNK_LATENTS = 4


def selected(key: str, seed: int, fraction: float) -> bool:
    """Whether a clip is in the QA sample: a hash of (seed, key), so the same clips every run."""
    if fraction <= 0:
        return False
    value = int.from_bytes(hashlib.sha256(f"{seed}/qa/{key}".encode()).digest()[:8], "little") / 2 ** 64
    return value < fraction


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


class QualityCheck:
    """Runs in the thread that finishes a unit, never holding the device: on CUDA on a stream of
    its own at the lowest priority, so the production model calls go first; PSNR and SSIM in
    float32 on the device (encoder_service/encode/quality.py)."""

    def __init__(self, checkpoint: str, model_config, device: str, chunk_frames, state: dict | None = None,
                 sha256: str | None = None):
        self.reference = LatentEncoder.load(checkpoint, model_config, "fp32", device, chunk_frames, state=state,
                                            sha256=sha256)
        cuda = self.reference.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.reference.device, priority=0) if cuda else None

    def check(self, clips: list[Clip], frames: np.ndarray, means: list[torch.Tensor],
              logvars: list[torch.Tensor]) -> list[QaRow]:
        """frames (N, T, H, W, 3) uint8 of the sampled clips; their stored means and logvars."""
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            return self._check(clips, frames, means, logvars)

    def _check(self, clips, frames, means, logvars) -> list[QaRow]:
        ref = self.reference.encode(frames)
        rows = []
        for i, clip in enumerate(clips):
            video = self._decode(means[i])
            target = torch.from_numpy(np.ascontiguousarray(frames[i])).to(video.device).permute(3, 0, 1, 2)[None]
            target = target.float() / 127.5 - 1
            rows.append(QaRow(clip.key, rel_l2(means[i], ref.mean[i]), rel_l2(logvars[i], ref.logvar[i]),
                              psnr(video, target), ssim(video, target)))
        return rows

    @torch.no_grad()
    def _decode(self, mean: torch.Tensor) -> torch.Tensor:
        vae = self.reference.vae
        with numerics(PRECISIONS["fp32"]):
            z = mean[None].to(self.reference.device, torch.float32)
            return vae.decode(z, chunk_latents=DECODE_CHUNK_LATENTS).float()

