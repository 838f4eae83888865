"""The way users run it, on a machine without a GPU: a Ray head started with `ray start` that
declares one logical GPU, the job sent with `ray job submit` as the README says (--num-gpus 1,
here with --device cpu so the GPU-scheduled encoder actor encodes on the CPU)."""
import json
import os
import subprocess

import pytest
from conftest import GOLDEN
from services import CLUSTER_ENV, RAY, ray_head

from encoder_service.samples import write_tar, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture
def head():
    with ray_head("--num-gpus=1") as (_, dashboard):
        yield dashboard


def test_ray_job_submit(head, tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=20, h=48, w=64)
    shard = write_tar(tmp_path / "shard-000000.tar", [("a", {"mp4": video.read_bytes()}), ("b", {"mp4": b"x"})])
    out = tmp_path / "out"
    result = subprocess.run(
        [RAY, "job", "submit", f"--address={head}", "--working-dir", ROOT, "--",
         "python", "pipelines/encode_dataset.py", "--input", str(shard), "--output", str(out),
         "--checkpoint", str(GOLDEN / "weights.safetensors"), "--num-frames", "9", "--size", "32x32",
         "--clips-per-video", "all", "--num-gpus", "1", "--device", "cpu", "--precision", "fp32",
         "--metrics-linger-s", "0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **CLUSTER_ENV})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '"shards_done": 1' in result.stdout and '"latents": 2' in result.stdout
    assert json.load(open(out / "_manifests" / "shard-000000.json"))["errors"]["rows"] == 1
