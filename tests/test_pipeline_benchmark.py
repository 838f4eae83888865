"""The pipeline benchmark with the acceptance script's smoke arguments (benchmarks/gpu_acceptance.sh),
in-process on the tests' running local Ray (a module late in the run, so the cluster is warm)."""
import json

import pytest

from benchmarks import bench_pipeline, common

pytestmark = pytest.mark.slow


def test_the_pipeline_benchmark_smoke(local_ray, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    record = bench_pipeline.main(["--smoke", "--shards", "1", "--videos", "2", "--video-frames", "20", "--num-frames",
                                  "9", "--size", "32x32"])
    assert record["runs"][0]["shards_done"] == 1 and record["runs"][0]["latents"] == 4
    assert json.loads((tmp_path / "pipeline_cpu.json").read_text())["runs"] == record["runs"]
