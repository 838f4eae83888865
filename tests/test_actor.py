"""The encoder actor's unit pipeline (encode/unit_encoder.py): units in flight together give exactly
the results of one at a time; frames are read from the Arrow buffer without a copy; statistics in
float32 and the float32 PSNR/SSIM equal the float64 formulas they replace (tolerances stated)."""
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import random_vae, small_config

from benchmarks.bench_actor import psnr_float64, ssim_float64
from encoder_service.encode.engine import LatentEncoder, channel_sums
from encoder_service.encode.quality import psnr, ssim
from encoder_service.encode.unit_encoder import UNITS_IN_FLIGHT, UnitEncoder, channel_stats
from encoder_service.ingest.units import UnitBuilder, UnitPlan
from encoder_service.job.stages import unit_and_frames
from encoder_service.records import Clip, RunMeta, StageRow, to_table
from encoder_service.table.folder import OutputFolder
from encoder_service.table.writer import UnitWriter

META = RunMeta("tiny", "0" * 64, "fp32", "test", [1.0] * 8, [0.0] * 8, "fp")


def unit_tables(n_units: int, clips: int = 5, shape=(9, 32, 40)) -> list[pa.Table]:
    rng = np.random.default_rng(1)
    tables = []
    for u in range(n_units):
        builder = UnitBuilder(f"shard-{u:06d}", UnitPlan(8, 4, 2, 1 << 30))
        rows = []
        for i in range(clips):
            clip = Clip(f"shard-{u:06d}/v{i}/0", "x.tar", f"v{i}", 0, list(range(shape[0])), 30.0, 30.0,
                        list(shape[1:]), 0, [0, 0, *shape[1:]], "x".join(map(str, shape)), "{}", None, None)
            rows += list(builder.add(clip, rng.integers(0, 256, (*shape, 3), dtype=np.uint8)))
        rows += list(builder.flush())
        tables.append(to_table(rows, StageRow))
    return tables


def encode_all(tables, in_flight: int, folder, cuda_graphs: bool = False) -> dict:
    encoder = LatentEncoder(random_vae(small_config()), "fp32", chunk_frames=4, cuda_graphs=cuda_graphs)
    coder = UnitEncoder(encoder, UnitWriter(OutputFolder(str(folder)), META), META, batch_size=2, store_logvar=True)
    results, todo, lock = {}, list(tables), threading.Lock()

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                table = todo.pop()
            unit, frames = unit_and_frames(table, 0)
            out = coder.encode(unit, frames)
            with lock:
                results[unit.shard_id] = out
    threads = [threading.Thread(target=worker) for _ in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "static-steps"])
def test_units_in_flight_give_the_results_of_one_at_a_time(tmp_path, cuda_graphs):
    """Also with --cuda-graphs' static steps (shared by the units in flight): the same bytes."""
    tables = unit_tables(6)
    serial = encode_all(tables, 1, tmp_path / "a")
    piped = encode_all(tables, UNITS_IN_FLIGHT, tmp_path / "b", cuda_graphs)
    assert set(serial) == set(piped) and len(serial) == 6
    for sid, out in serial.items():
        a, b = out.result, piped[sid].result
        assert (a.file.rows, a.file.bytes, a.file.sha256) == (b.file.rows, b.file.bytes, b.file.sha256)
        assert a.mean_stats == b.mean_stats and a.logvar_stats == b.logvar_stats and a.ledger == b.ledger
        assert a.encode_seconds == out.timing.model > 0  # the unit reports model time, nothing else


def test_unit_frames_are_a_view_of_the_arrow_buffer():
    """Two units in one table of two chunks: each unit's frames are read in place."""
    tables = unit_tables(2, clips=3)
    table = pa.concat_tables(tables)
    for i in range(2):
        unit, frames = unit_and_frames(table, i)
        column = table.column("unit").chunk(i).field("frames")
        data = column.buffers()[2]
        assert frames.__array_interface__["data"][0] >= data.address
        assert frames.__array_interface__["data"][0] + frames.nbytes <= data.address + data.size
        expected = np.frombuffer(column[0].as_py(), np.uint8).reshape(frames.shape)
        assert np.array_equal(frames, expected) and unit.shard_id == f"shard-{i:06d}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_channel_statistics_in_float32_equal_float64(dtype):
    """Per-clip sums in float32 (where the latents are made), added in float64: within 1e-5
    relative of float64 throughout, for latents of WF-VAE-L's size at 33x256²."""
    g = torch.Generator().manual_seed(0)
    latents = [(torch.randn(16, 9, 32, 32, generator=g) * 3 + 1).to(dtype) for _ in range(6)]
    sums = [(torch.stack([channel_sums(x[None])[0], channel_sums(x[None])[0]]), x[0].numel()) for x in latents]
    mean, _ = channel_stats(sums)
    x = torch.stack(latents).double().transpose(0, 1).flatten(1)
    assert mean.count == [x.shape[1]] * 16
    assert torch.allclose(torch.tensor(mean.sum, dtype=torch.float64), x.sum(1), rtol=1e-5, atol=1e-3)
    assert torch.allclose(torch.tensor(mean.sum_sq, dtype=torch.float64), (x * x).sum(1), rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 1, 16, 16), (2, 3, 5, 24, 40), (1, 3, 9, 33, 47)])
def test_float32_psnr_and_ssim_equal_the_float64_formulas(shape):
    """The QA figures of before (float64, 11x11 window) and now: SSIM within 1e-6, PSNR 1e-4 dB."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(shape, generator=g) * 2 - 1
    b = (a + 0.2 * torch.randn(shape, generator=g)).clamp(-1, 1)
    assert ssim(a, b) == pytest.approx(ssim_float64(a, b), abs=1e-6)
    assert psnr(a, b) == pytest.approx(psnr_float64(a, b), abs=1e-4)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind, ms_per_clip, busy_ok", [
    ("host_paying", 0.5, lambda busy: busy < 0.9),  # the real forward's host work (~10 ms a call) >> 2 ms of device
    ("sleep", 25.0, lambda busy: busy >= 0.95),     # nothing on the host: the device waits for nothing
], ids=["host-bound", "sleeping"])
def test_busy_is_the_devices_share_and_falls_when_the_host_bounds_it(tmp_path, kind, ms_per_clip, busy_ok):
    """The actor's busy seconds (wfvae_encoder_busy_seconds) over the span of its model calls, with
    UNITS_IN_FLIGHT units in flight: the device's time, not the model call's wall time, so a
    host-bound stand-in reads idle and a sleeping one busy."""
    from benchmarks.bench_actor import run, unit_table
    from benchmarks.stand_ins import stand_in
    shape = (33, 32, 32)
    encoder = stand_in(kind, ms_per_clip / 1000, shape)
    runs = run(encoder, unit_table(shape, 8), units=4, in_flight=UNITS_IN_FLIGHT, batch_size=4, folder=str(tmp_path))
    busy = runs["model_s"] / runs["span_s"]
    assert busy_ok(busy), f"{kind} at {ms_per_clip} ms/clip: busy {busy:.3f}"
    assert runs["dispatch_s"] > 0
