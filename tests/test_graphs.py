"""The steady chunk a CUDA graph replays (model/graphs.py), checked on the CPU: its results equal
whole-clip encoding, the causal cache's buffers keep their addresses from chunk to chunk, and the
step neither synchronises with the host nor allocates cache buffers (a TorchDispatchMode sees every
op the step runs, as a CUDA run would launch them)."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from encoder_service.encode.engine import LatentEncoder
from encoder_service.model import EncoderStream
from encoder_service.model.cache import CausalCache
from encoder_service.model.graphs import GraphedEncoder
from tests.conftest import random_vae, small_config

# ops that make the host wait for the device (a value read back), or decide on data
HOST_SYNC = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose", "masked_select"}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def vae():
    return random_vae(small_config(base_channels=8), seed=3)


def frames(b=2, t=33, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, t, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("chunk", [None, 4, 8, 12, 16, 32])
@pytest.mark.parametrize("t", [1, 17, 33])
def test_graphed_steps_equal_whole_clip(vae, chunk, t):
    """fp32 on the CPU: equal to 1e-6 (the same ops on the same values; chunked == whole holds exactly
    on this path, the tolerance is for summation order), for every chunking, clip length and a
    second clip through the same steps."""
    whole = LatentEncoder(vae, "fp32", chunk_frames=None)
    graphed = LatentEncoder(vae, "fp32", chunk_frames=chunk, cuda_graphs=True)
    for seed in (0, 1):
        x = frames(t=t, seed=seed)
        ref, out = whole.encode(x), graphed.encode(x)
        torch.testing.assert_close(out.mean, ref.mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.logvar, ref.logvar, rtol=0, atol=1e-6)


def test_steady_chunks_reuse_cache_buffers(vae):
    """From a clip's second chunk on, every causal-cache tensor stays at its address."""
    x = torch.from_numpy(frames(t=33)).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1)
    stream, addresses = EncoderStream(vae, chunk_frames=4), []
    for lo, hi in [(0, 5)] + [(i, i + 4) for i in range(5, 33, 4)]:
        stream.push(x[:, :, lo:hi], last=hi == 33)
        addresses.append({id(k): v.data_ptr() for k, v in stream.cache.tensors().items()})
    assert len(addresses[0]) >= 8  # every causal conv and the wavelet's
    assert all(a == addresses[0] for a in addresses[1:]), "a steady chunk reallocated the causal cache"


def test_steady_step_has_no_host_sync_and_allocates_no_cache(vae):
    x = torch.from_numpy(frames(t=13)).permute(0, 4, 1, 2, 3)
    cache = CausalCache()
    vae.encoder(x[:, :, :5], cache)
    vae.encoder(x[:, :, 5:9], cache)
    held = {id(k): v.data_ptr() for k, v in cache.tensors().items()}
    log = OpLog()
    with torch.no_grad(), log:
        vae.encoder(x[:, :, 9:13], cache)
    assert log.ops and not HOST_SYNC & set(log.ops), sorted(HOST_SYNC & set(log.ops))
    assert {id(k): v.data_ptr() for k, v in cache.tensors().items()} == held, "the step reallocated its context"


def test_graph_buffers_are_reused_across_clips(vae):
    graphs = GraphedEncoder(vae.encoder, capture=False)
    before = None
    for seed in (0, 1, 2):
        x = torch.from_numpy(frames(t=33, seed=seed)).permute(0, 4, 1, 2, 3)
        with torch.no_grad():
            graphs(x, 8)
        (step, static), = [v for k, v in graphs.steps.items() if k[0] == "chunk"]
        now = (step.input.data_ptr(), sorted(v.data_ptr() for v in static.tensors().values()))
        assert before is None or now == before
        before = now
    assert (graphs.replays, graphs.eager) == (3 * 3, 3)  # 33 frames in chunks of 8: 9 eager, then 3 steady


def test_compile_and_graphs_are_one_or_the_other(vae):
    with pytest.raises(ValueError, match="one or the other"):
        LatentEncoder(vae, "fp32", compile=True, cuda_graphs=True)
