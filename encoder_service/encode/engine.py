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
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from encoder_service import options
from encoder_service.model import WFVAE, DiagonalGaussian
from encoder_service.model.blocks import SCORE_BYTES
from encoder_service.model.graphs import GraphedEncoder
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
    sums: torch.Tensor | None = None  # (B, 2, 2, z) float32: per clip and channel, sum and sum of squares
    #                                   of mean and of logvar (computed where the latents were made)
    done: object = None   # a CUDA event recorded after the copies to the host; None: they are done
    compile_seconds: float = 0.0  # this call's share spent compiling (its shape was new), in its wall time
    dispatch_seconds: float = 0.0  # the calling thread's CPU time in the call: Python, dispatch, launches
    device_seconds: float | None = None  # the device's own time when the encoder knows it (a stand-in);
    #                                      None: the caller times the call (CUDA events around it)


class PinnedBuffers:
    """Page-locked host buffers, reused: a fresh pin_memory() per batch costs a page-locking
    allocation each time. `slots` buffers, one per batch in flight; each grows to the largest
    batch it has held."""

    def __init__(self, slots: int = 2):
        self.free = [torch.empty(0, dtype=torch.uint8) for _ in range(slots)]
        self.lock = threading.Condition()

    def take(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            while not self.free:
                self.lock.wait()
            buf = self.free.pop()
        if buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buf

    def give(self, buf: torch.Tensor) -> None:
        with self.lock:
            self.free.append(buf)
            self.lock.notify()


class LatentEncoder:
    """chunk_frames: frames per causal-cache chunk (a multiple of 4), None for whole clips, or
    "auto": the largest multiple of 4 whose activations fit in half the free device memory.
    channels_last: keep 3D weights (and so activations) NDHWC, cuDNN's fast layout; on by default
    on CUDA. A model passed in is copied if it must change dtype or layout.
    compile: run the model through torch.compile (COMPILE_OPTIONS: static shapes, one graph, so
    each new batch shape and chunking compiles once, which its first call pays; compile_seconds
    adds those up). Off by default until a GPU run has measured it.
    cuda_graphs: replay a whole-clip batch, or each steady chunk, as one CUDA graph (model/graphs.py;
    the same static-buffer steps run eagerly off CUDA). Off by default until a GPU run has measured
    it; not with compile (one or the other: torch.compile's reduce-overhead mode would graph the
    first, special chunk too)."""

    def __init__(self, vae: WFVAE, precision: str | options.Precision = "bf16",
                 chunk_frames: int | str | None = 16, channels_last: bool | None = None, compile: bool = False,
                 cuda_graphs: bool = False):
        if compile and cuda_graphs:
            raise ValueError("compile and cuda_graphs are one or the other")
        self.precision = options.precision(precision)
        self.chunk_frames = chunk_frames
        self.compiled, self.compile_seconds, self._shapes, self._auto = compile, 0.0, set(), {}
        self._moments = torch.compile(self._model, **COMPILE_OPTIONS) if compile else self._model
        if compile:  # one compiled graph per bucket shape: more than dynamo's default of 8 may be in use
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.device = next(vae.parameters()).device
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        if vae.dtype != self.precision.compute or (self.channels_last and not weights_channels_last(vae)):
            vae = copy.deepcopy(vae).to(dtype=self.precision.compute)
            if self.channels_last:
                to_channels_last_3d(vae)
        self.vae = vae.eval()
        self.graphs = GraphedEncoder(self.vae.encoder, capture=self.device.type == "cuda") if cuda_graphs else None
        if self.device.type == "cuda":
            self.pinned, self.copy_stream = PinnedBuffers(), torch.cuda.Stream(self.device)

    @classmethod
    def load(cls, checkpoint: str, config=None, precision: str = "bf16", device: str | None = None,
             chunk_frames: int | str | None = 16, channels_last: bool | None = None,
             compile: bool = False, state: dict | None = None, sha256: str | None = None,
             cuda_graphs: bool = False) -> "LatentEncoder":
        """state/sha256: the checkpoint's weights and hash when the caller holds them already
        (WFVAE.from_pretrained)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        vae = WFVAE.from_pretrained(checkpoint, config=config, dtype=options.precision(precision).compute,
                                    device=device, state=state, sha256=sha256)
        if channels_last if channels_last is not None else device.type == "cuda":
            to_channels_last_3d(vae)  # our own model: change it in place
        return cls(vae, precision, chunk_frames, channels_last, compile, cuda_graphs)

    @property
    def config(self):
        return self.vae.config

    def chunk_for(self, shape) -> int | None:
        """Frames per chunk for a batch of (B, T, H, W, 3) clips; None = the whole clip at once.
        "auto" is decided once per batch shape (from the free memory then): the same shape always
        runs the same chunking, so a compiled graph or a CUDA graph made for it is used again."""
        b, t, h, w = shape[:4]
        chunk = self.chunk_frames
        if chunk == "auto":
            if (b, h, w) not in self._auto:
                self._auto[b, h, w] = auto_chunk_frames(self.device, b * h * w, self.precision.compute)
            chunk = self._auto[b, h, w]
        return chunk if chunk and t > chunk + 1 else None

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> Encoded:
        """uint8 (B, T, H, W, 3) -> posterior mean and logvar (B, z, t, h, w) on the host."""
        encoded = self.forward(self.to_device(frames))
        wait(encoded)
        return encoded

    def to_device(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Checked frames on the device as (B, 3, T, H, W) (a view of NDHWC storage). On CUDA they
        pass through a reused pinned buffer and are copied on a side stream, so this call overlaps
        the model running on the main stream; forward() waits for the copy."""
        with warnings.catch_warnings():  # frames may be a read-only view of a Ray object: only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            x = torch.as_tensor(frames)
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ClipRejected(f"expected clips as (B, T, H, W, 3) frames, got {tuple(x.shape)}")
        try:
            check_video(x[:0].permute(0, 4, 1, 2, 3), self.precision.compute)
        except ValueError as exc:
            raise ClipRejected(str(exc)) from exc
        if x.is_floating_point() and x.numel():  # checked here, on the host: the model does not
            lo, hi = x.aminmax()                 # (a data-dependent branch would split a compiled graph)
            if lo < 0 or hi > 255:
                raise ClipRejected(f"float frames must be in [0, 255], got [{lo.item():.3g}, {hi.item():.3g}]")
        if self.device.type == "cuda" and not x.is_cuda:
            x = self._copy_in(x)
        return x.permute(0, 4, 1, 2, 3)  # a view: no copy

    def _copy_in(self, x: torch.Tensor) -> torch.Tensor:
        nbytes = x.numel() * x.element_size()
        buf = self.pinned.take(nbytes)
        staged = buf[:nbytes].view(x.dtype).view(x.shape)
        staged.copy_(x)
        with torch.cuda.stream(self.copy_stream):
            out = staged.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        torch.cuda.current_stream(self.device).wait_event(copied)
        out.record_stream(torch.cuda.current_stream(self.device))
        copied.synchronize()  # the pinned buffer may be reused once its bytes are on the device
        self.pinned.give(buf)
        return out

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> Encoded:
        """The model on device frames from to_device(): mean, logvar, finiteness and per-clip channel
        sums (float32, on the device) are queued for the host right after it, into pinned memory,
        so they arrive while the next batch computes; wait(result) before reading them."""
        chunk = self.chunk_for((x.shape[0], x.shape[2], *x.shape[3:]))
        key, start, cpu = (tuple(x.shape), x.dtype, chunk), time.perf_counter(), time.thread_time()
        with numerics(self.precision):
            mean, logvar = self._moments(x, chunk)
        compile_seconds = 0.0
        if self.compiled and key not in self._shapes:  # this call compiled: its whole wall time counts
            self._shapes.add(key)                     # (the run itself is small beside the compile)
            compile_seconds = time.perf_counter() - start
            self.compile_seconds += compile_seconds
        finite = torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(logvar).flatten(1).all(1)
        sums = torch.stack([channel_sums(mean), channel_sums(logvar)], dim=1)  # (B, 2, 2, z)
        storage = self.precision.storage
        out = [mean.to(storage), logvar.to(storage), finite, sums]
        if self.device.type != "cuda":
            return Encoded(*out, compile_seconds=compile_seconds, dispatch_seconds=time.thread_time() - cpu)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in out]
        done = torch.cuda.Event()
        done.record()
        return Encoded(*host, done=done, compile_seconds=compile_seconds, dispatch_seconds=time.thread_time() - cpu)

    def _model(self, x: torch.Tensor, chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames on the device -> (mean, logvar): what torch.compile compiles."""
        if x.dtype != torch.uint8:  # float frames in [0, 255]
            x = x.to(self.precision.compute).div(127.5).sub(1.0)
        if self.graphs is not None:
            posterior = DiagonalGaussian(self.graphs(check_video(x, self.vae.dtype), chunk))
        else:
            posterior = self.vae.encode(x, chunk_frames=chunk)
        return posterior.mean, posterior.logvar


# static shapes (the job's clips come in a few bucket shapes), the whole model as one graph (an
# error, not a silent fallback, if anything breaks it), inductor's default mode (no CUDA graphs:
# the actor's streams and pinned buffers are outside the graph)
COMPILE_OPTIONS = {"dynamic": False, "fullgraph": True, "mode": "default"}


def wait(encoded: Encoded) -> Encoded:
    """Until the results of forward() are on the host."""
    if encoded.done is not None:
        encoded.done.synchronize()
        encoded.done = None
    return encoded


def channel_sums(x: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) -> (B, 2, C) float32: per clip and channel, the sum and the sum of squares."""
    flat = x.float().flatten(2)
    return torch.stack([flat.sum(-1), flat.square().sum(-1)], dim=1)


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
    """Channels-last storage for every conv weight: NDHWC for 5D ones, NHWC for the 4D weights of
    per-frame convs (which run as 3D convs of the unsqueezed weight, then NDHWC too), so every
    convolution runs channels-last on channels-last inputs with nothing converted inside it.
    (Module.to(memory_format=) takes one format for all and fails on the mix.)"""
    for p in model.parameters():
        if p.ndim in (4, 5):
            p.data = p.data.contiguous(memory_format=_CHANNELS_LAST[p.ndim])


def weights_channels_last(model: torch.nn.Module) -> bool:
    return all(p.is_contiguous(memory_format=_CHANNELS_LAST[p.ndim]) for p in model.parameters() if p.ndim in (4, 5))


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def auto_chunk_frames(device: torch.device, pixels: int, compute: torch.dtype, fraction: float = 0.5) -> int | None:
    """The largest multiple of 4 frames whose activations (pixels = B*H*W per frame) fit in
    `fraction` of the free memory; None (whole clips) off CUDA, where memory is not the limit."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return frames_that_fit(free, pixels, compute, fraction)


def frames_that_fit(free: int, pixels: int, compute: torch.dtype, fraction: float = 0.5) -> int:
    """Frames per chunk for `free` bytes, after the attention scores (bounded by SCORE_BYTES, whatever
    the resolution: attention is query-blocked); chunk_for() takes the whole clip when it fits."""
    usable = max(0, free * fraction - SCORE_BYTES)
    frames = int(usable / (pixels * ACTIVATION_BYTES_PER_PIXEL[compute]))
    return max(4, frames // 4 * 4)
