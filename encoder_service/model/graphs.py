"""CUDA graphs for the encoder (`--cuda-graphs`): a whole-clip batch, or each steady chunk of a
chunked one, is one graph replay instead of hundreds of kernel launches, each paying Python and
dispatch time on the host (411-1,921 ops per clip for WF-VAE-L, depending on the chunking).

What a graph needs, and where it comes from here:
- fixed addresses: the frames are copied into a static input buffer; the causal cache's buffers
  are written in place from a clip's second chunk on (CausalCache.keep), and each clip's state is
  loaded into the graph's own cache before its first replay; outputs live in the graph's pool and
  are copied out after each replay;
- no host synchronisation and the same Python path on every replay: a clip's first chunk (frame 0
  is special) runs eagerly, every later chunk of the steady length replays, a shorter last chunk
  runs eagerly on the graph's cache (tests/test_graphs.py checks the step's ops with a
  TorchDispatchMode).

Off CUDA the same steps run eagerly on the same static buffers: the CPU tests check their results
against whole-clip encoding and that the buffers keep their addresses. One graph per (batch shape,
dtype, chunk): the job's clips come in a few bucket shapes.
"""
from collections.abc import Callable

import torch
from torch import nn

from encoder_service.model.cache import CausalCache


class StaticStep:
    """fn(input) over a static input buffer: captured once as a CUDA graph and replayed, or (off
    CUDA, capture=False) run as is on the same buffer."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, capture: bool,
                 warmup: int = 2):
        self.fn, self.graph = fn, None
        self.input = torch.empty_like(example, memory_format=torch.channels_last_3d)  # the frames' NDHWC layout
        self.input.copy_(example)
        if capture:
            self._capture(warmup)

    def _capture(self, warmup: int) -> None:
        device = self.input.device
        side = torch.cuda.Stream(device)  # warm-up (cuDNN autotuning, Triton compiles) off the capture
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.fn(self.input)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the actor's other units copy frames in on their own streams meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = self.fn(self.input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.input.copy_(x)
        if self.graph is None:
            return self.fn(self.input)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the graph's output


class GraphedEncoder:
    """Encoder(x, chunk) -> moments, through StaticSteps. `replays` counts the graph replays
    (static steps off CUDA), `eager` the chunks that ran eagerly: launches per clip follow."""

    def __init__(self, encoder: nn.Module, capture: bool):
        self.encoder, self.capture = encoder, capture
        self.steps: dict[tuple, tuple[StaticStep, CausalCache | None]] = {}
        self.replays = self.eager = 0

    def __call__(self, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
        if chunk is None or x.shape[2] <= chunk + 1:
            return self._whole(x)
        cache = CausalCache()
        first = chunk + 1
        out = [self.encoder(x[:, :, :first], cache)]
        self.eager += 1
        for lo in range(first, x.shape[2], chunk):
            piece = x[:, :, lo:lo + chunk]
            if piece.shape[2] == chunk:
                cache = self._steady(piece, cache, out)
            else:  # a shorter last chunk: eagerly, keeping no context
                cache.last = True
                out.append(self.encoder(piece, cache))
                cache.last = False
                self.eager += 1
        return torch.cat(out, dim=2)

    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        key = ("whole", tuple(x.shape), x.dtype)
        if key not in self.steps:
            self.steps[key] = (StaticStep(self.encoder, x, self.capture), None)
        self.replays += 1
        return self.steps[key][0](x)

    def _steady(self, piece: torch.Tensor, cache: CausalCache, out: list) -> CausalCache:
        """One steady chunk through its step; the cache the clip goes on with (the step's own, loaded
        with the clip's state on its first steady chunk)."""
        key = ("chunk", tuple(piece.shape), piece.dtype, _signature(cache))
        if key not in self.steps:
            static = cache.copy()
            self.steps[key] = (StaticStep(lambda inp: self.encoder(inp, static), piece, self.capture), static)
        step, static = self.steps[key]
        if cache is not static and not static.load(cache):
            raise RuntimeError("causal cache does not match its graph's buffers")  # the key holds its shapes
        out.append(step(piece))
        self.replays += 1
        return static


def _signature(cache: CausalCache) -> tuple:
    return tuple(sorted((id(k), tuple(v.shape), v.dtype) for k, v in cache.tensors().items()))
