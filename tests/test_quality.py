"""The quality report of a run: per-shard latent statistics, drift against fp32 on a seeded sample,
reconstruction spot checks, drift against the folder's history, and `inspect`."""
import json
import os
import shutil

import pytest
import torch
from conftest import GOLDEN
from safetensors.torch import load_file, save_file
from services import make_bucket, s3_server  # noqa: F401
from tables import latent_rows, records

from encoder_service import cli
from encoder_service.encode.qa import selected
from encoder_service.job.config import load_config
from encoder_service.job.run import run_job
from encoder_service.records import ChannelStats
from encoder_service.samples import write_tar, write_video
from encoder_service.table import totals
from encoder_service.table.schema import decode_tensor

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    for s in range(2):
        samples = [(f"v{v}", {"mp4": write_video(d / f"{s}{v}.mp4", frames=20, h=48, w=64, start=7 * v).read_bytes()})
                   for v in range(3)]
        write_tar(d / f"shard-{s:06d}.tar", samples)
    return d


def inspect(capsys, *args):
    """`python -m encoder_service inspect ARGS` in-process (the README test runs it as a command):
    the parsed report with --json, else the text."""
    capsys.readouterr()
    assert cli.main(["inspect", *args]) == 0
    text = capsys.readouterr().out
    return json.loads(text) if "--json" in args else text


def job(inp, out, *extra, checkpoint=str(GOLDEN / "weights.safetensors")):
    return run_job(load_config(["--input", str(inp), "--output", str(out), "--checkpoint", checkpoint,
                                "--num-frames", "9", "--size", "32x32", "--clips-per-video", "all", "--num-gpus", "0",
                                "--precision", "fp32", "--batch-size", "2", "--progress-every-s", "1000",
                                "--metrics-linger-s", "0", *extra]))


@pytest.fixture(scope="module")
def fp32_run(shards, tmp_path_factory):
    """One shard in fp32 with every clip in the QA sample."""
    out = tmp_path_factory.mktemp("fp32")
    return out, job(f"{shards}/shard-000000.tar", out, "--qa-fraction", "1")


def test_shard_statistics_equal_the_latent_rows(fp32_run):
    out, record = fp32_run
    manifest = records(out)["shard-000000"]
    rows = latent_rows(out)
    for kind in ("mean", "logvar"):
        x = torch.stack([decode_tensor(r[kind], r["latent_shape"], r["latent_dtype"]) for r in rows]).double()
        per_channel = x.transpose(0, 1).flatten(1)
        stats = totals.channel_summary(ChannelStats(**manifest["stats"][kind]))  # records hold sums
        assert stats["count"] == [per_channel.shape[1]] * per_channel.shape[0]
        assert torch.allclose(torch.tensor(stats["mean"], dtype=torch.float64), per_channel.mean(1), atol=1e-9)
        assert torch.allclose(torch.tensor(stats["std"], dtype=torch.float64), per_channel.std(1, unbiased=False),
                              atol=1e-7)
    assert manifest["checkpoint_sha256"] == record["settings"]["checkpoint_sha256"]
    assert manifest["non_finite_rejected"] == 0


@pytest.mark.parametrize("precision, low, high", [("fp32", 0.0, 1e-5), ("bf16", 1e-3, 0.1)])
def test_drift_against_fp32(fp32_run, shards, tmp_path, precision, low, high):
    """Every clip in the QA sample: bf16 latents drift measurably from fp32, fp32 ones do not."""
    out, record = fp32_run
    if precision != "fp32":
        out = tmp_path / "out"
        record = job(f"{shards}/shard-000000.tar", out, "--precision", precision, "--qa-fraction", "1")
    qa = record["quality"]["qa"]
    assert qa["clips"] == record["latents"]
    assert low <= qa["drift_mean"]["mean"] <= qa["drift_mean"]["max"] <= high, qa
    assert qa["psnr_db"] > 0 and -1 <= qa["ssim"] <= 1
    assert len(records(out)["shard-000000"]["qa_rows"]) == record["latents"] and "random weights" in qa["note"]


def test_the_qa_sample_is_deterministic_for_a_seed(shards, tmp_path):
    keys = [f"shard/v{i}/0" for i in range(2000)]
    a = [k for k in keys if selected(k, 0, 0.1)]
    assert a == [k for k in keys if selected(k, 0, 0.1)] and a != [k for k in keys if selected(k, 1, 0.1)]
    assert 150 < len(a) < 250  # ~10 %
    record = job(f"{shards}/shard-000000.tar", tmp_path / "out", "--qa-fraction", "0.5", "--seed", "3")
    clips = [r["key"] for r in latent_rows(tmp_path / "out", ["key"])]
    sampled = [q["key"] for q in records(tmp_path / "out")["shard-000000"]["qa_rows"]]
    assert sorted(sampled) == sorted(k for k in clips if selected(k, 3, 0.5))  # the run samples what the seed says
    assert record["quality"]["qa"]["clips"] == len(sampled) > 0


def test_an_altered_weight_shows_up_as_drift(fp32_run, shards, tmp_path):
    """A checkpoint with one changed weight, rerun over the folder (--overwrite): its latent means leave
    the folder's history by more than the alert's bound (the rule itself: alerts_test.yml)."""
    first_out, first = fp32_run
    assert first["quality"]["drift"]["mean"]["history"] is False
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    same = job(f"{shards}/shard-000000.tar", out, "--overwrite", "--qa-fraction", "1")
    assert same["quality"]["drift"]["mean"]["mean_shift_ratio"] < 1e-6 and not same["quality"]["drift"]["mean"]["alert"]
    weights = load_file(GOLDEN / "weights.safetensors")
    weights["encoder.conv_out.conv.bias"][0] += 1.0  # one weight: latent channel 0's mean moves
    altered = tmp_path / "ckpt" / "weights.safetensors"
    altered.parent.mkdir()
    save_file(weights, altered)
    shutil.copy(GOLDEN / "config.json", altered.parent / "config.json")
    changed = job(f"{shards}/shard-000000.tar", out, "--overwrite", "--qa-fraction", "1", checkpoint=str(altered))
    drift = changed["quality"]["drift"]["mean"]
    assert drift["alert"] and drift["mean_shift_ratio"] > changed["quality"]["drift_bounds"]["mean_shift_ratio"]


def test_inspect_lists_done_failed_pending_and_missing_shards(shards, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(shards / "shard-000000.tar", d / "shard-000000.tar")
    (d / "shard-000001.tar").write_bytes(b"")  # unreadable for the run below: removed before it starts
    os.unlink(d / "shard-000001.tar")
    job(f"{d}/shard-{{000000..000001}}.tar", tmp_path / "out", "--qa-fraction", "1")
    shutil.copy(shards / "shard-000000.tar", d / "shard-000003.tar")  # added later: still to do
    report = inspect(capsys, str(tmp_path / "out"), "--input", f"{d}/shard-{{000000..000003}}.tar", "--json")
    assert report["shards_done"] == ["shard-000000"] and list(report["shards_failed"]) == ["shard-000001"]
    assert report["shards_pending"] == ["shard-000003"] and report["shards_missing"] == ["shard-000002"]
    assert report["qa"]["clips"] == report["latents"] > 0 and report["settings"]["size"] == "32x32"
    text = inspect(capsys, str(tmp_path / "out"))
    assert "1 shards done, 1 failed" in text and "failed  shard-000001: " in text and "QA: " in text


def test_inspect_an_s3_folder(shards, s3_server, capsys):  # noqa: F811
    endpoint, storage, _ = s3_server
    bucket = make_bucket(storage, "inspected")
    job(f"{shards}/shard-000000.tar", f"{bucket}/out", "--s3-endpoint-url", endpoint)
    assert inspect(capsys, f"{bucket}/out", "--s3-endpoint-url", endpoint, "--json")["shards_done"] == ["shard-000000"]
