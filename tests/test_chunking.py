"""Causal-cache inference equals whole-clip inference for every length and chunk plan.

Tolerances: float64 max|diff| <= 1e-10; float32 max|diff| <= 1e-5 * max|whole-clip output|.
"""
import random

import pytest
import torch
from conftest import max_abs, random_vae, small_config

LENGTHS = [1, 5, 9, 13, 17, 21, 25, 33, 65]
ENC_CHUNKS = [4, 8, 12, 16, None]
DEC_CHUNKS = [1, 2, 3, 4, 8, None]


def video(t, h=16, w=16, b=1, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + t)
    return (torch.rand(b, 3, t, h, w, generator=g, dtype=dtype) * 2 - 1)


def within(a, b, dtype):
    if dtype == torch.float64:
        return max_abs(a, b) <= 1e-10
    return max_abs(a, b) <= 1e-5 * b.abs().max().item()


@pytest.fixture(scope="module", params=["golden", "random-s"])
def model(request, golden_vae):
    """(vae in float64, vae in float32): the golden weights, and random weights with the S structure."""
    if request.param == "golden":
        return golden_vae(torch.float64), golden_vae(torch.float32)
    return (random_vae(small_config(), seed=1, dtype=torch.float64),
            random_vae(small_config(), seed=1, dtype=torch.float32))


@pytest.mark.parametrize("t", LENGTHS)
def test_chunked_encode_equals_whole(model, t):
    for vae, dtype in zip(model, (torch.float64, torch.float32)):
        x = video(t, dtype=dtype)
        whole = vae.encode(x).moments
        for n in ENC_CHUNKS[:-1]:
            assert within(vae.encode(x, chunk_frames=n).moments, whole, dtype), (t, n, dtype)


@pytest.mark.parametrize("t", LENGTHS)
def test_chunked_decode_equals_whole(model, t):
    latents = (t - 1) // 4 + 1
    for vae, dtype in zip(model, (torch.float64, torch.float32)):
        z = torch.randn(1, vae.config.latent_dim, latents, 2, 2, dtype=dtype,
                        generator=torch.Generator().manual_seed(t))
        whole = vae.decode(z)
        assert whole.shape[2] == t
        for m in DEC_CHUNKS[:-1]:
            assert within(vae.decode(z, chunk_latents=m), whole, dtype), (t, m, dtype)


def test_prefix_stability(model):
    """The first k+1 latents of a long clip are the latents of its first 4k+1 frames."""
    vae = model[0]
    x = video(33)
    full = vae.encode(x).moments
    for k in (0, 1, 2, 5):
        assert max_abs(vae.encode(x[:, :, :4 * k + 1]).moments, full[:, :, :k + 1]) <= 1e-10


def test_streaming_with_random_piece_sizes(model):
    vae, rng = model[0], random.Random(0)
    x = video(33, b=2)
    enc = vae.encode_stream(chunk_frames=8)
    got, pos = [], 0
    while pos < 33:
        n = rng.randint(1, 7)
        out = enc.push(x[:, :, pos:pos + n])
        pos = min(pos + n, 33)
        got.append(out.moments) if out is not None else None
        assert sum(g.shape[2] for g in got) == (pos - 1) // 4 + 1, "each latent frame as soon as it is final"
    enc.close()
    whole = vae.encode(x).moments
    assert max_abs(torch.cat(got, 2), whole) <= 1e-10

    z = whole[:, :vae.config.latent_dim]
    dec, frames, pos = vae.decode_stream(chunk_latents=2), [], 0
    while pos < z.shape[2]:
        n = rng.randint(1, 3)
        out = dec.push(z[:, :, pos:pos + n])
        pos = min(pos + n, z.shape[2])
        frames.append(out) if out is not None else None
        # all frames up to the look-ahead are out: 4(pos-1)+1 minus the 2 waiting for the next latent
        assert sum(f.shape[2] for f in frames) == max(1, 4 * (pos - 1) - 1)
    frames.append(dec.close())
    assert max_abs(torch.cat(frames, 2), vae.decode(z)) <= 1e-10


def test_one_frame_at_a_time(model):
    vae = model[0]
    x = video(9)
    stream = vae.encode_stream()
    outs = [stream.push(x[:, :, i:i + 1]) for i in range(9)]
    assert [o is not None for o in outs] == [True, False, False, False, True, False, False, False, True]
    assert max_abs(torch.cat([o.moments for o in outs if o is not None], 2), vae.encode(x).moments) <= 1e-10


def test_stream_refuses_incomplete_clip(model):
    stream = model[0].encode_stream()
    stream.push(video(7))
    with pytest.raises(ValueError, match="2 frame\\(s\\) that do not complete a latent frame"):
        stream.close()


def test_bad_chunk_sizes_are_refused(model):
    with pytest.raises(ValueError, match="multiple of 4"):
        model[0].encode(video(9), chunk_frames=6)
    with pytest.raises(ValueError, match=">= 1"):
        model[0].decode(torch.zeros(1, model[0].config.latent_dim, 3, 2, 2, dtype=torch.float64), chunk_latents=0)


def test_one_model_serves_interleaved_clips_of_different_lengths_and_shapes(model):
    """No state lives on the modules: two streams interleave on one model, then a third length."""
    vae = model[0]
    a, b = video(17, 16, 16, seed=1), video(13, 24, 8, b=2, seed=2)
    sa, sb = vae.encode_stream(4), vae.encode_stream(4)
    outs_a, outs_b = [sa.push(a[:, :, :1])], [sb.push(b[:, :, :1])]
    for i in range(1, 17, 4):
        outs_a.append(sa.push(a[:, :, i:i + 4]))
        if i < 13:
            outs_b.append(sb.push(b[:, :, i:i + 4]))
    assert max_abs(torch.cat([o.moments for o in outs_a], 2), vae.encode(a).moments) <= 1e-10
    assert max_abs(torch.cat([o.moments for o in outs_b], 2), vae.encode(b).moments) <= 1e-10
    c = video(21, 8, 8)
    assert max_abs(vae.encode(c, chunk_frames=8).moments, vae.encode(c).moments) <= 1e-10


def test_official_tiled_outputs_reproduced(golden_vae, golden_input, golden_outputs):
    """golden-small's tiled_moments/tiled_decoded (official: 4-frame encoder, 2-latent decoder chunks)."""
    vae, ref = golden_vae(torch.float32), golden_outputs[torch.float32]
    assert max_abs(vae.encode(golden_input, chunk_frames=4).moments, ref["tiled_moments"]) <= 1e-4
    assert max_abs(vae.decode(ref["mean"], chunk_latents=2), ref["tiled_decoded"]) <= 2e-4


@pytest.mark.parametrize("t", [5, 13, 21, 29])
def test_official_failure_cases_work(golden_vae, t):
    """T <= 8 has no official chunk size; even latent counts (T = 5 mod 8) corrupt Open-Sora Plan's
    last 6 decoded frames with 2-latent chunks."""
    vae = golden_vae(torch.float64)
    x = video(t, 32, 32)
    z = vae.encode(x, chunk_frames=4).mean
    assert max_abs(z, vae.encode(x).mean) <= 1e-10
    assert max_abs(vae.decode(z, chunk_latents=2), vae.decode(z)) <= 1e-10


def test_chunked_memory_does_not_grow_with_clip_length():
    """Tensor bytes allocated by operators (deterministic, not timed): peak at T=257 <= 1.2x T=33."""
    from benchmarks.bench_chunk_memory import stream_decode
    from benchmarks.common import peak_memory
    vae = random_vae(small_config())
    peaks = {}
    with torch.no_grad():
        for t in (33, 257):
            x, z = video(t, 32, 32, dtype=torch.float32), torch.randn(1, 8, (t - 1) // 4 + 1, 4, 4)
            peaks[t] = (peak_memory(lambda x=x: vae.encode(x, chunk_frames=8), "cpu"),
                        peak_memory(lambda z=z: stream_decode(vae, z, 2), "cpu"))
    assert peaks[257][0] <= 1.2 * peaks[33][0] and peaks[257][1] <= 1.2 * peaks[33][1], peaks
