"""The benchmark scripts run (CPU smoke mode) and compare what they claim to compare."""
import json
from argparse import Namespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench_encoder, bench_ingest, bench_kernels
from encoder_service.model import WFVAE
from encoder_service.model.config import PRESETS
from kernels import haar_reference, norm_reference

FIELDS = ("device", "torch", "impl", "model", "shape", "batch", "dtype", "clips_per_s", "latency_ms",
          "peak_mem_bytes", "tflops")


def test_encoder_benchmark_smoke(tmp_path):
    out = tmp_path / "encoder.json"
    records = bench_encoder.main(["--smoke", "--device", "cpu", "--out", str(out)])
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    for rec in json.loads(out.read_text())["records"]:
        assert all(rec[k] is not None for k in FIELDS), rec
    bf16 = [r for r in records if r["dtype"] == "bfloat16"]
    assert all(0 < r["bf16_vs_fp32_rel_l2"] < 0.05 for r in bf16)
    assert out.with_suffix(".png").exists()


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


def test_kernel_benchmark_smoke():
    args = Namespace(device="cpu", dtype="fp32", batch=1, frames=5, size=16, channels=8, warmup=1, repeats=2)
    payload = bench_kernels.run(args)
    kinds = {(r["kernel"], r["impl"]) for r in payload["results"]}
    assert ("haar_pyramid", "official") in kinds and ("channel_layer_norm_silu", "reference") in kinds
    assert payload["copy_gb_per_s"] > 0 and all(r["gb_per_s"] > 0 for r in payload["results"])


def test_ingest_benchmark_smoke(tmp_path):
    """Ours beside the ffmpeg reference command on the same source, one core."""
    payload = bench_ingest.main(["--quick", "--repeats", "1", "--out", str(tmp_path / "ingest.json")])
    assert {r["decoder"] for r in payload["records"]} == {"pyav", "decord"}
    assert all(r["ours_fps"] > 0 and r["ffmpeg_fps_without_startup"] > 0 and r["ratio"] > 0 for r in payload["records"])
    assert (tmp_path / "ingest.png").exists()
