"""Stand-ins for LatentEncoder on a machine without a GPU, for the actor's benchmark and tests: the
same members (device, to_device, forward), latents of WF-VAE-L's shape, a stated device time per
clip.

    sleep         the call sleeps the device time: the thread waits holding nothing, as if the host
                  had launched a whole forward at no cost. The kind case, kept for comparison.
    host_paying   the call first does the real forward's host work: WF-VAE-L's modules at tiny
                  width run the real op sequence for the case's batch and chunking on 16x16 frames
                  (every op dispatched from Python, the GIL held between ATen calls, as on CUDA),
                  then sleeps what is left of the device time. A device cannot run ahead of its
                  launches, so a call lasts max(host, device) and reports device_seconds = the stated
                  time: when the host is slow (the GIL held by the actor's other units, too few
                  cores), the device's busy share falls, as it would on a GPU.
"""
import time

import numpy as np
import torch

from encoder_service.encode.engine import Encoded, channel_sums
from encoder_service.model import WFVAE, WFVAEConfig

LATENT_DIM = 16  # WF-VAE-L
STAND_INS = ("sleep", "host_paying")
TINY_L = WFVAEConfig(base_channels=8, encoder_energy_flow_hidden_size=8, decoder_energy_flow_hidden_size=8,
                     name="wfvae-l-structure-tiny")  # WF-VAE-L's modules and ops, 8 channels wide


class SleepingModel:
    def __init__(self, seconds_per_clip: float, shape, chunk_frames: int | None = 16):
        t, h, w = shape[0], shape[1], shape[2]
        self.seconds_per_clip, self.chunk_frames, self.device = seconds_per_clip, chunk_frames, torch.device("cpu")
        self.latent = torch.randn(64, LATENT_DIM, (t - 1) // 4 + 1, h // 8, w // 8).to(torch.bfloat16)
        self.host_seconds = 0.0  # the host work the calls paid, all calls

    def to_device(self, frames: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(frames).permute(0, 4, 1, 2, 3)

    def forward(self, x: torch.Tensor) -> Encoded:
        device = self.seconds_per_clip * x.shape[0]
        cpu, start = time.thread_time(), time.perf_counter()
        self._host_work(x)
        host = time.perf_counter() - start
        self.host_seconds += host
        time.sleep(max(0.0, device - host))  # the device finishes its queue
        b = x.shape[0]
        mean = logvar = self.latent[:b]
        sums = torch.stack([channel_sums(mean), channel_sums(logvar)], dim=1)
        return Encoded(mean, logvar, torch.ones(b, dtype=torch.bool), sums,
                       dispatch_seconds=time.thread_time() - cpu, device_seconds=device)

    def _host_work(self, x: torch.Tensor) -> None:
        pass


class HostPayingModel(SleepingModel):
    def __init__(self, seconds_per_clip: float, shape, chunk_frames: int | None = 16):
        super().__init__(seconds_per_clip, shape, chunk_frames)
        torch.manual_seed(0)
        self.tiny = WFVAE(TINY_L).eval()
        self.frames = {}

    def _host_work(self, x: torch.Tensor) -> None:
        b, t = x.shape[0], x.shape[2]
        if (b, t) not in self.frames:
            self.frames[b, t] = torch.zeros(b, 3, t, 16, 16)
        chunk = self.chunk_frames if self.chunk_frames and t > self.chunk_frames + 1 else None
        with torch.no_grad():
            self.tiny.encode(self.frames[b, t], chunk_frames=chunk)


def stand_in(kind: str, seconds_per_clip: float, shape, chunk_frames: int | None = 16) -> SleepingModel:
    return {"sleep": SleepingModel, "host_paying": HostPayingModel}[kind](seconds_per_clip, shape, chunk_frames)
