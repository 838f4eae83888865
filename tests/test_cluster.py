"""The job on a simulated multi-node cluster (ray.cluster_utils.Cluster on this machine): a head for
the driver, two CPU-only ingest nodes and an encoder node with a logical GPU, placed by node labels.
One ingest node is removed in the middle of the run: the output equals a clean run's byte for byte,
no row is missing or duplicated, and a rerun writes nothing."""
import json
import threading
import time

import pytest
import ray
from conftest import GOLDEN
from ray.cluster_utils import Cluster
from tables import latent_rows, shard_ids
from test_job import files

from encoder_service.job.config import load_config
from encoder_service.job.run import run_job
from encoder_service.samples import write_tar, write_video

pytestmark = pytest.mark.slow
SHARDS, VIDEOS = 4, 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    for s in range(SHARDS):
        samples = [(f"v{v}", {"mp4": write_video(d / f"{s}{v}.mp4", frames=18, h=48, w=64).read_bytes()})
                   for v in range(VIDEOS)]
        write_tar(d / f"shard-{s:06d}.tar", samples)
    return f"{d}/shard-{{000000..{SHARDS - 1:06d}}}.tar"


@pytest.fixture
def cluster():
    ray.shutdown()  # a local cluster of other tests, if any: the driver joins this one
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "labels": {"wfvae-role": "driver"}})
    ingest = [c.add_node(num_cpus=2, labels={"wfvae-role": "ingest"}) for _ in range(2)]
    c.add_node(num_cpus=2, num_gpus=1, labels={"wfvae-role": "encoder"})
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, ingest
    ray.shutdown()
    c.shutdown()


def job(shards, out):
    return run_job(load_config([
        "--input", shards, "--output", str(out), "--checkpoint", str(GOLDEN / "weights.safetensors"),
        "--num-frames", "9", "--size", "32x32", "--clips-per-video", "all", "--precision", "fp32",
        "--batch-size", "2", "--num-gpus", "1", "--device", "cpu", "--ingest-labels", "wfvae-role=ingest",
        "--encoder-labels", "wfvae-role=encoder", "--progress-every-s", "1000", "--metrics-linger-s", "0"]))


def remove_when_first_unit_is_written(cluster: Cluster, node, out, removed: dict) -> threading.Thread:
    """Kill `node` as soon as the first unit's data file is written (encoding has begun; commits are
    quick, so waiting for the first commit can be waiting for the last); records how many shards
    were committed then."""
    def watch():
        deadline = time.time() + 300
        while time.time() < deadline and not any((out / "latents").glob("*.parquet")):
            time.sleep(0.02)
        cluster.remove_node(node, allow_graceful=False)
        removed["committed_then"] = len(shard_ids(out)) if (out / "_shards" / "_delta_log").exists() else 0
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_node_lost_mid_run_changes_nothing(cluster, shards, tmp_path):
    c, (ingest_a, ingest_b) = cluster
    clean = job(shards, tmp_path / "clean")
    assert clean["shards_done"] == SHARDS and clean["shards_failed"] == 0

    removed = {}
    watcher = remove_when_first_unit_is_written(c, ingest_b, tmp_path / "lost", removed)
    lost = job(shards, tmp_path / "lost")
    watcher.join()
    assert removed["committed_then"] < SHARDS, "the node was lost in the middle of the run"
    assert lost["shards_done"] == SHARDS and lost["latents"] == clean["latents"]
    assert files(tmp_path / "lost") == files(tmp_path / "clean")
    keys = [r["key"] for r in latent_rows(tmp_path / "lost", ["key"])]
    assert len(keys) == len(set(keys)) == clean["latents"]

    before = files(tmp_path / "lost")
    again = job(shards, tmp_path / "lost")
    assert again["shards_skipped"] == SHARDS and files(tmp_path / "lost") == before
    assert json.load(open(tmp_path / "lost" / "_summary.json"))["latents"] == clean["latents"]
