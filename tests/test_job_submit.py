"""The way users run it: a Ray head started with `ray start`, the job sent with `ray job submit`."""
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import GOLDEN
from encoder_service.samples import write_tar, write_video
from services import free_port, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
pytestmark = pytest.mark.slow
# a throw-away cluster on 127.0.0.1: Ray 2.60's token authentication is switched off for it
# the head runs job entrypoints with the `python` on its PATH: this environment's, as in a real image
CLUSTER_ENV = {"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled",
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own process group, so stopping it touches no other Ray."""
    gcs, dash = free_port(), free_port()
    env = {**os.environ, **CLUSTER_ENV}
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
                             "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", timeout=90)
        yield f"http://127.0.0.1:{dash}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        stale = "/tmp/ray/ray_current_cluster"  # would make a later plain ray.init() join the dead head
        if os.path.exists(stale):
            os.unlink(stale)


def test_ray_job_submit(ray_head, tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=20, h=48, w=64)
    shard = write_tar(tmp_path / "shard-000000.tar", [("a", {"mp4": video.read_bytes()}), ("b", {"mp4": b"x"})])
    out = tmp_path / "out"
    result = subprocess.run(
        [RAY, "job", "submit", f"--address={ray_head}", "--working-dir", ROOT, "--",
         "python", "pipelines/encode_dataset.py", "--input", str(shard), "--output", str(out),
         "--checkpoint", str(GOLDEN / "weights.safetensors"), "--num-frames", "9", "--size", "32x32",
         "--clips-per-video", "all", "--num-gpus", "0", "--precision", "fp32"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **CLUSTER_ENV})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '"shards_done": 1' in result.stdout and '"latents": 2' in result.stdout
    assert json.load(open(out / "part-shard-000000.manifest.json"))["error_rows"] == 1
