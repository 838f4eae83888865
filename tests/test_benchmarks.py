"""The benchmark scripts run (CPU smoke mode) and compare what they claim to compare."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import small_config
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench_ingest, bench_kernels
from benchmarks.bench_pipeline import random_checkpoint
from benchmarks.common import RESULTS
from encoder_service.model import WFVAE
from encoder_service.model.config import PRESETS
from kernels import haar_reference, norm_reference

ROOT = Path(__file__).resolve().parents[1]
# the acceptance steps run here as a script (the pipeline step's benchmark: tests/test_pipeline_benchmark.py,
# in-process on the tests' Ray; encoder_official is encoder_ours' function, measuring nothing on a CPU)
SMOKE_STEPS = ("correctness", "kernels", "aot", "encoder_ours", "chunk_memory", "actor", "text")
ACTOR_FIELDS = ("size", "stand_in", "host_ms_per_clip_critical_path", "host_ms_per_clip_serial")
FIELDS = ("device", "torch", "impl", "model", "shape", "batch", "dtype", "clips_per_s", "latency_ms",
          "peak_mem_bytes", "tflops")


def test_the_gpu_acceptance_script_runs_on_cpu(tmp_path):
    """benchmarks/gpu_acceptance.sh --smoke: the steps a GPU session runs, on the CPU at tiny sizes,
    into a results folder of their own (the committed results are not touched)."""
    committed = {p: p.stat().st_mtime_ns for p in RESULTS.iterdir()}
    env = {**os.environ, "WFVAE_BENCH_RESULTS": str(tmp_path), "PYTHON": sys.executable, "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_acceptance.sh"), "--smoke", *SMOKE_STEPS],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    steps = json.loads((tmp_path / "acceptance_cpu.json").read_text())
    assert list(steps) == ["environment", *SMOKE_STEPS] and all(v["status"] == "ok" for v in steps.values()), steps
    assert {p: p.stat().st_mtime_ns for p in RESULTS.iterdir()} == committed
    assert "triton" in json.loads((tmp_path / "environment_cpu.json").read_text())
    text = json.loads((tmp_path / "text_cpu.json").read_text())
    assert text["text_encoder_over_transformers"] > 0 and text["estimate"]["tflop_per_caption"] > 4

    records = json.loads((tmp_path / "encoder_ours_cpu.json").read_text())["records"]
    assert len(records) == 4 and all(r["status"] == "ok" and all(r[k] is not None for k in FIELDS) for r in records)
    assert all(0 < r["bf16_vs_fp32_rel_l2"] < 0.05 for r in records if r["dtype"] == "bfloat16")
    assert (tmp_path / "encoder_ours_cpu.png").exists()

    actor = json.loads((tmp_path / "actor_cpu.json").read_text())
    assert actor["cases"] and all(all(c[k] is not None for k in ACTOR_FIELDS) for c in actor["cases"])
    busy = [v for c in actor["cases"] for k, v in c.items() if k.startswith("busy_fraction_at_")]
    assert busy and all(0 < b <= 1 for b in busy)
    assert {c["stand_in"] for c in actor["cases"]} == {"sleep", "host_paying"}
    assert all(r["graph_replays_per_steady_chunk"] in (None, 1) for r in actor["launches"])

    kernels = json.loads((tmp_path / "kernels_cpu.json").read_text())
    kinds = {(r["kernel"], r["impl"]) for r in kernels["results"]}
    assert ("haar_pyramid", "official") in kinds and ("channel_layer_norm_silu", "reference") in kinds
    assert kernels["copy_gb_per_s"] > 0 and all(r["gb_per_s"] > 0 for r in kernels["results"])

    assert json.loads((tmp_path / "chunk_memory_cpu.json").read_text())["rows"]


def test_a_random_checkpoint_loads(tmp_path):
    """What bench_pipeline --preset encodes with on the device machine (no released weights there)."""
    config = small_config()
    vae = WFVAE.from_pretrained(random_checkpoint(config, tmp_path))
    assert vae.config.to_dict() == config.to_dict()


def test_encoder_flops_match_the_cost_model():
    """FlopCounterMode (what the benchmark divides by time) counts 18.05 TFLOP for WF-VAE-L at
    33x512x512, as ../shared/spec/cost-model.md; run on the meta device, no memory needed."""
    with torch.device("meta"):
        vae = WFVAE(PRESETS["wfvae-l-16chn"]).eval()
    x = torch.empty(1, 3, 33, 512, 512, dtype=torch.uint8, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.encoder(x)
    assert abs(counter.get_total_flops() / 1e12 - 18.05) < 0.01


def test_official_formulations_compute_the_same_functions():
    x = torch.rand(2, 3, 9, 16, 24) * 2 - 1
    f3 = bench_kernels._filters(3, haar_reference.HAAR3D_TAP, "cpu", torch.float32)
    f2 = bench_kernels._filters(2, haar_reference.HAAR2D_TAP, "cpu", torch.float32)
    for got, want in zip(bench_kernels.official_pyramid(x, f3, f2), haar_reference.haar_pyramid(x)):
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-6
    a, w, b = torch.randn(1, 8, 3, 4, 4), torch.rand(8), torch.rand(8)
    assert torch.allclose(bench_kernels.official_layer_norm_silu(a, w, b),
                          norm_reference.channel_layer_norm(a, w, b, 1e-6, True), atol=1e-6)


def test_ingest_benchmark_smoke(tmp_path):
    """Ours beside the ffmpeg reference command on the same source, one core."""
    payload = bench_ingest.main(["--quick", "--repeats", "1", "--out", str(tmp_path / "ingest.json")])
    assert {r["decoder"] for r in payload["records"]} == {"pyav", "decord"}
    assert all(r["ours_fps"] > 0 and r["ffmpeg_fps_without_startup"] > 0 and r["ratio"] > 0 for r in payload["records"])
    assert (tmp_path / "ingest.png").exists()


def test_reader_benchmark_smoke(tmp_path):
    env = {**os.environ, "WFVAE_BENCH_RESULTS": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_reader", "--shards", "2", "--rows", "8",
                             "--workers", "0", "--latent", "16x3x8x8", "--batch-size", "4", "--prefetch-mb", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "reader_cpu.json").read_text())
    assert record["results"]["reader"]["rows"] == record["results"]["pyarrow"]["rows"] == 16
    assert record["reader_over_pyarrow"] > 0 and record["memory"][0]["prefetch_mb"] == 1
