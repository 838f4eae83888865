"""The Ray job end to end on a real local Ray cluster (CPU actors), real shards and real videos."""
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from conftest import GOLDEN
from encoder_service import WFVAE
from encoder_service.ingest.clips import IngestConfig, ingest_shard
from encoder_service.job.config import load_config
from encoder_service.job.run import run_job
from encoder_service.samples import write_tar, write_video
from encoder_service.shards import LatentShardDataset
from encoder_service.shards.schema import decode_tensor
from services import make_bucket, s3_server  # noqa: F401

CKPT = str(GOLDEN / "weights.safetensors")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # workers inherit the driver's environment: credentials for the local S3 server must be set first
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    media = d / "media"
    media.mkdir()
    for s in range(3):
        samples = [(f"v{v}", {"mp4": write_video(media / f"{s}{v}.mp4", frames=20 + 6 * v, h=48, w=64).read_bytes(),
                              "json": json.dumps({"caption": f"{s}-{v}"}).encode()}) for v in range(3)]
        samples.insert(1, ("bad", {"mp4": b"garbage"}))
        write_tar(d / f"shard-{s:06d}.tar", samples)
    return d


def job(inp, out, *extra):
    cfg, _ = load_config(["--input", str(inp), "--output", str(out), "--checkpoint", CKPT, "--num-frames", "9",
                          "--size", "32x32", "--clips-per-video", "all", "--num-gpus", "0", "--precision", "fp32",
                          "--batch-size", "2", "--progress-every-s", "1000", "--metrics-linger-s", "0", *extra])
    return run_job(cfg)


def files(out):
    return {p: open(os.path.join(out, p), "rb").read() for p in sorted(os.listdir(out)) if p.endswith(".parquet")}


@pytest.fixture(scope="module")
def clean_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    summary = job(f"{shards}/shard-{{000000..000002}}.tar", out)
    return out, summary


def test_rows_ledger_and_counts(clean_run, shards):
    out, summary = clean_run
    assert summary["shards_done"] == 3 and summary["shards_failed"] == 0
    # 3 videos per shard of 20, 26, 32 frames at 9-frame clips: 2 + 2 + 3 non-overlapping clips
    assert summary["clips"] == 21 and summary["latents"] == 21
    assert summary["errors_by_reason"] == {"probe/corrupt": 3}
    for s in range(3):
        part = pq.read_table(os.path.join(out, f"part-shard-{s:06d}.parquet"))
        errors = pq.read_table(os.path.join(out, f"errors-shard-{s:06d}.parquet")).to_pylist()
        manifest = json.load(open(os.path.join(out, f"part-shard-{s:06d}.manifest.json")))
        assert part.num_rows == manifest["rows"] == 7 and len(errors) == manifest["error_rows"] == 1
        assert errors[0]["key"] == f"shard-{s:06d}/bad" and "shard-%06d.tar" % s in errors[0]["message"]


def test_latents_equal_a_direct_encode(clean_run, shards):
    out, _ = clean_run
    vae = WFVAE.from_pretrained(CKPT)
    cfg, _ = load_config(["--input", "x", "--num-frames", "9", "--size", "32x32", "--clips-per-video", "all"])
    clips = {r["key"]: r for kind, r in ingest_shard(str(shards / "shard-000001.tar"), IngestConfig(cfg.sampling()))
             if kind == "clip"}
    rows = {r["key"]: r for r in pq.read_table(os.path.join(out, "part-shard-000001.parquet")).to_pylist()}
    assert set(rows) == set(clips)
    for key, clip in clips.items():
        x = torch.from_numpy(clip["frames"]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        expected = vae.encode(x)
        got = decode_tensor(rows[key]["mean"], rows[key]["latent_shape"], rows[key]["latent_dtype"])
        assert torch.allclose(got, expected.mean[0], atol=1e-5), key
        assert rows[key]["frame_indices"] == clip["frame_indices"] and rows[key]["vae_sha256"]
    assert len(list(LatentShardDataset(str(out)))) == 21


def test_rerun_changes_nothing(clean_run, shards):
    out, _ = clean_run
    before = files(out)
    summary = job(f"{shards}/shard-{{000000..000002}}.tar", out)
    assert summary["shards_skipped"] == 3 and summary["shards_done"] == 0
    assert files(out) == before


def test_deleted_manifest_redoes_only_that_shard_identically(clean_run, shards):
    out, _ = clean_run
    before = files(out)
    os.unlink(os.path.join(out, "part-shard-000002.manifest.json"))
    summary = job(f"{shards}/shard-{{000000..000002}}.tar", out)
    assert summary["shards_done"] == 1 and summary["shards_skipped"] == 2
    assert files(out) == before


def test_killed_actor_gives_the_same_output(clean_run, shards, tmp_path):
    out, _ = clean_run
    marker = tmp_path / "killed"
    summary = job(f"{shards}/shard-*.tar", tmp_path / "out", "--inject-fault", f"kill-actor-after:2:{marker}")
    assert marker.exists(), "the fault was injected"
    assert summary["shards_done"] == 3 and summary["latents"] == 21
    assert files(tmp_path / "out") == files(out)


def test_nan_latents_are_rejected_not_written(shards, tmp_path):
    summary = job(f"{shards}/shard-000000.tar", tmp_path / "out", "--inject-fault", "nan:/v1/")
    assert summary["errors_by_reason"]["encode/non_finite_latent"] == 2
    keys = pq.read_table(tmp_path / "out" / "part-shard-000000.parquet").column("key").to_pylist()
    assert keys and not any("/v1/" in k for k in keys)
    assert summary["clips"] == summary["latents"] + 2


def test_input_and_output_on_s3(shards, s3_server):  # noqa: F811
    endpoint, storage = s3_server
    bucket = make_bucket(storage, "videos")
    import s3fs
    fs = s3fs.S3FileSystem(**storage.for_url("s3://x"))
    for s in range(2):
        fs.put_file(str(shards / f"shard-{s:06d}.tar"), f"videos/in/shard-{s:06d}.tar")
    summary = job(f"{bucket}/in/shard-{{000000..000001}}.tar", f"{bucket}/latents", "--s3-endpoint-url", endpoint)
    assert summary["shards_done"] == 2 and summary["latents"] == 14
    assert len(list(LatentShardDataset(f"{bucket}/latents", storage=storage))) == 14
