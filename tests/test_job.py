"""The Ray job end to end on a real local Ray cluster that declares one logical GPU, with real shards
and real videos: the GPU scheduling path (--num-gpus 1, the encoder on --device cpu) and the CPU one
give the same bytes; exactly-once commits, resume, faults that are not the input's."""
import json
import os
import shutil

import pyarrow.dataset
import pyarrow.parquet as pq
import pytest
import torch
from conftest import GOLDEN
from services import make_bucket, s3_server  # noqa: F401

from encoder_service import WFVAE
from encoder_service.ingest.clips import IngestConfig, IngestedClip, ingest_shard
from encoder_service.job.config import load_config
from encoder_service.job.faults import ENV as FAULTS
from encoder_service.job.run import JobFailed, run_job
from encoder_service.samples import write_tar, write_video
from encoder_service.table import LatentShardDataset, decode_tensor

CKPT = str(GOLDEN / "weights.safetensors")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]
# 3 shards x (3 videos of 20, 26, 32 frames -> 2 + 2 + 3 non-overlapping 9-frame clips, and one broken sample)
CLIPS_PER_SHARD = 7


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
    cfg = load_config(["--input", str(inp), "--output", str(out), "--checkpoint", CKPT, "--num-frames", "9",
                       "--size", "32x32", "--clips-per-video", "all", "--num-gpus", "1", "--device", "cpu",
                       "--precision", "fp32", "--batch-size", "2", "--progress-every-s", "1000",
                       "--metrics-linger-s", "0", *extra])
    return run_job(cfg)


def files(out) -> dict[str, bytes]:
    """Every data, ledger and manifest file of an output folder, by relative path."""
    out = str(out)
    found = {}
    for folder in ("latents", "errors", "_manifests"):
        for name in sorted(os.listdir(os.path.join(out, folder))):
            found[f"{folder}/{name}"] = open(os.path.join(out, folder, name), "rb").read()
    return found


@pytest.fixture(scope="module")
def clean_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return out, job(f"{shards}/shard-{{000000..000002}}.tar", out)


def test_rows_ledger_and_counts(clean_run):
    out, summary = clean_run
    assert summary["shards_done"] == 3 and summary["shards_failed"] == 0
    assert summary["clips"] == summary["latents"] == 3 * CLIPS_PER_SHARD
    assert summary["errors_by_reason"] == {"probe/corrupt": 3}
    for s in range(3):
        manifest = json.load(open(out / "_manifests" / f"shard-{s:06d}.json"))
        errors = pq.read_table(out / manifest["errors"]["name"]).to_pylist()
        assert sum(f["rows"] for f in manifest["files"]) == manifest["latents"] == CLIPS_PER_SHARD
        assert len(errors) == manifest["errors"]["rows"] == 1
        assert errors[0]["key"] == f"shard-{s:06d}/bad" and f"shard-{s:06d}.tar" in errors[0]["message"]
    folder = json.load(open(out / "summary.json"))
    assert folder["shards"] == 3 and folder["latents"] == 21 and folder["ledger_by_reason"] == {"probe/corrupt": 3}


def test_gpu_scheduled_run_equals_the_cpu_run(clean_run, shards, tmp_path):
    """--num-gpus 1 (an actor holding the cluster's logical GPU, encoding on --device cpu) and
    --num-gpus 0 (CPU actors) write the same bytes."""
    out, _ = clean_run
    summary = job(f"{shards}/shard-{{000000..000002}}.tar", tmp_path / "cpu", "--num-gpus", "0")
    assert summary["shards_done"] == 3
    assert files(tmp_path / "cpu") == files(out)


def test_latents_equal_a_direct_encode(clean_run, shards):
    out, _ = clean_run
    vae = WFVAE.from_pretrained(CKPT)
    cfg = load_config(["--input", "x", "--num-frames", "9", "--size", "32x32", "--clips-per-video", "all"])
    clips = {i.clip.key: i for i in ingest_shard(str(shards / "shard-000001.tar"), IngestConfig(cfg.sampling()))
             if isinstance(i, IngestedClip)}
    rows = {r["key"]: r for r in pq.read_table(out / "latents" / "part-shard-000001-00000.parquet").to_pylist()}
    assert set(rows) == set(clips)
    for key, item in clips.items():
        x = torch.from_numpy(item.frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        got = decode_tensor(rows[key]["mean"], rows[key]["latent_shape"], rows[key]["latent_dtype"])
        assert torch.allclose(got, vae.encode(x).mean[0], atol=1e-5), key
        assert rows[key]["frame_indices"] == item.clip.frame_indices and rows[key]["vae_sha256"]
    assert len(list(LatentShardDataset(str(out)))) == 21
    assert pyarrow.dataset.dataset(str(out / "latents")).count_rows() == 21  # plain Parquet: latents only


def test_rerun_changes_nothing(clean_run, shards):
    out, _ = clean_run
    before = files(out)
    summary = job(f"{shards}/shard-{{000000..000002}}.tar", out)
    assert summary["shards_skipped"] == 3 and summary["shards_done"] == 0
    assert files(out) == before
    assert json.load(open(out / "summary.json"))["latents"] == 21  # the folder, not this no-op invocation
    import tempfile
    assert "RAY_DATA_LOGGING_CONFIG" not in os.environ  # nothing of ours left in $TMPDIR
    assert not os.path.exists(os.path.join(tempfile.gettempdir(), f"wfvae-ray-data-logging-{os.getpid()}.yaml"))


def test_deleted_manifest_redoes_only_that_shard_identically(clean_run, shards):
    out, _ = clean_run
    before = files(out)
    os.unlink(out / "_manifests" / "shard-000002.json")
    summary = job(f"{shards}/shard-{{000000..000002}}.tar", out)
    assert summary["shards_done"] == 1 and summary["shards_skipped"] == 2
    assert files(out) == before


def test_several_data_files_per_shard(clean_run, shards, tmp_path):
    """Small data files: each shard's latents split over several files, all listed by its manifest,
    the same rows as one file per shard."""
    out, _ = clean_run
    summary = job(f"{shards}/shard-000000.tar", tmp_path / "small", "--file-mb", "0.015")
    manifest = json.load(open(tmp_path / "small" / "_manifests" / "shard-000000.json"))
    assert summary["latents"] == CLIPS_PER_SHARD and len(manifest["files"]) > 2
    split = pyarrow.dataset.dataset(str(tmp_path / "small" / "latents")).to_table().sort_by("key")
    whole = pq.read_table(out / "latents" / "part-shard-000000-00000.parquet").sort_by("key")
    assert split.column("key") == whole.column("key") and split.column("mean") == whole.column("mean")


def test_a_killed_actor_and_a_fault_that_is_not_the_inputs_are_retried(clean_run, shards, tmp_path, monkeypatch):
    """An encoder actor killed after two calls, and a RuntimeError while encoding one unit (as a CUDA
    error would be), which ends its actor: both units are retried in fresh actors, the output is the
    same."""
    out, killed, raised = clean_run[0], tmp_path / "killed", tmp_path / "raised"
    monkeypatch.setenv(FAULTS, json.dumps({"kill_after_calls": 2, "kill_marker": str(killed),
                                           "raise_unit": "shard-000001/0", "times": 1, "marker": str(raised)}))
    summary = job(f"{shards}/shard-*.tar", tmp_path / "out")
    assert killed.exists(), "the actor was killed"
    assert raised.read_text() == "shard-000001/0\n", "the fault was injected once"
    assert summary["shards_done"] == 3 and summary["shards_failed"] == 0 and summary["latents"] == 21
    assert files(tmp_path / "out") == files(out)


def test_a_fault_while_writing_is_retried_like_a_model_fault(clean_run, shards, tmp_path, monkeypatch):
    """The data file is written beside the model, in the thread that finishes the unit: a fault
    there (a store failing, a bug) ends the actor like a CUDA error does; the unit is retried in a
    fresh actor and nothing is lost or doubled."""
    out, raised = clean_run[0], tmp_path / "raised"
    monkeypatch.setenv(FAULTS, json.dumps({"raise_unit": "shard-000002/0", "times": 1, "raise_stage": "write",
                                           "marker": str(raised)}))
    summary = job(f"{shards}/shard-*.tar", tmp_path / "out")
    assert raised.read_text() == "shard-000002/0\n"
    assert summary["shards_done"] == 3 and summary["latents"] == 21
    assert files(tmp_path / "out") == files(out)


def test_a_persistent_fault_fails_its_shard_uncommitted(clean_run, shards, tmp_path, monkeypatch):
    out, marker = clean_run[0], tmp_path / "raised"
    monkeypatch.setenv(FAULTS, json.dumps({"raise_unit": "shard-000001/0", "times": 5, "marker": str(marker)}))
    summary = job(f"{shards}/shard-*.tar", tmp_path / "out")
    assert summary["shards_done"] == 2 and list(summary["failed_shards"]) == ["shard-000001"]
    assert "failed 2 times: RuntimeError: injected fault" in summary["failed_shards"]["shard-000001"]
    assert marker.read_text().count("\n") == 2, "tried twice, then given up"
    assert not (tmp_path / "out" / "_manifests" / "shard-000001.json").exists()
    assert not any("shard-000001" in name for name in os.listdir(tmp_path / "out" / "latents"))
    monkeypatch.delenv(FAULTS)
    again = job(f"{shards}/shard-*.tar", tmp_path / "out")  # the next run redoes it, and only it
    assert again["shards_done"] == 1 and again["shards_skipped"] == 2
    assert files(tmp_path / "out") == files(out)


def test_nan_latents_are_rejected_not_written(shards, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULTS, json.dumps({"nan_keys": "/v1/"}))
    summary = job(f"{shards}/shard-000000.tar", tmp_path / "out")
    assert summary["errors_by_reason"]["encode/non_finite_latent"] == 2
    keys = pyarrow.dataset.dataset(str(tmp_path / "out" / "latents")).to_table().column("key").to_pylist()
    assert keys and not any("/v1/" in k for k in keys)
    assert summary["clips"] == summary["latents"] + 2


def test_a_gpu_actor_without_cuda_is_a_clear_error(shards, tmp_path):
    """--device auto on an actor that holds a (logical) GPU where torch has no CUDA."""
    with pytest.raises(JobFailed, match="holds GPU .* torch sees no CUDA device.*--device cpu"):
        job(f"{shards}/shard-000000.tar", tmp_path / "out", "--device", "auto")


def test_the_driver_receives_no_latents(clean_run):
    """What reaches the driver is a few small records per unit: bounded per clip whatever the clip size."""
    _, summary = clean_run
    assert summary["driver_bytes_received"] / summary["clips"] < 4096


def test_input_and_output_on_s3(shards, s3_server):  # noqa: F811
    endpoint, storage, _ = s3_server
    bucket = make_bucket(storage, "videos")
    import s3fs
    fs = s3fs.S3FileSystem(**storage.for_url("s3://x"))
    for s in range(2):
        fs.put_file(str(shards / f"shard-{s:06d}.tar"), f"videos/in/shard-{s:06d}.tar")
    summary = job(f"{bucket}/in/shard-{{000000..000001}}.tar", f"{bucket}/latents", "--s3-endpoint-url", endpoint)
    assert summary["shards_done"] == 2 and summary["latents"] == 14
    assert len(list(LatentShardDataset(f"{bucket}/latents", storage=storage))) == 14
    assert fs.exists("videos/latents/_manifests/shard-000001.json")


def test_dry_run(shards, capsys):
    from encoder_service.job.dryrun import dry_run
    cfg = load_config(["--input", f"{shards}/shard-000000.tar", "--output", "unused", "--checkpoint", CKPT,
                       "--num-frames", "9", "--size", "32x32", "--clips-per-video", "all", "--num-gpus", "0",
                       "--precision", "fp32", "--dry-run", "20"])
    report = dry_run(cfg)
    assert report["clips"] == CLIPS_PER_SHARD and report["decode_frames_per_s_per_cpu"] > 0
    assert "ingest CPUs per CPU encoder" in capsys.readouterr().out


def test_leftovers_of_a_crashed_run_are_cleaned(clean_run, shards, tmp_path):
    """A run killed while committing shard-000002 (its intent written, its files in place, its
    manifest not yet), with staged files and a temporary left: the next run's start removes what
    the cut-off commit wrote, with no listing of latents/, and the run completes the folder."""
    from encoder_service.job.plan import clean_leftovers
    from encoder_service.storage import filesystem
    out = tmp_path / "out"
    shutil.copytree(clean_run[0], out)
    manifest = json.loads((out / "_manifests" / "shard-000002.json").read_text())
    (out / "_manifests" / "shard-000002.json").unlink()
    staging = out / "_staging" / "shard-000002"
    staging.mkdir(parents=True)
    names = [f["name"] for f in manifest["files"]] + [manifest["errors"]["name"]]
    (staging / "_commit.json").write_text(json.dumps({"shard_id": "shard-000002", "files": names}))
    (staging / "00000-dead.parquet").write_bytes(b"half")
    (out / "_staging" / "_tmp-dead.json").write_bytes(b"half")
    assert visible_shards(out) == {"shard-000000", "shard-000001", "shard-000002"}
    clean_leftovers(*filesystem(str(out)))
    assert not (out / "_staging").exists()
    assert visible_shards(out) == {"shard-000000", "shard-000001"}
    assert not (out / "errors" / "errors-shard-000002.parquet").exists()
    summary = job(f"{shards}/shard-{{000000..000002}}.tar", out)
    assert summary["shards_done"] == 1 and summary["shards_by_reason"] == {"new": 1}
    assert files(out) == files(clean_run[0])


def test_leftovers_of_a_folder_without_index_are_found_by_listing(clean_run, shards, tmp_path):
    """A folder written before the index (schema 2) has no commit intents: its first run lists
    latents/ once for files of shards without a manifest and for temporaries."""
    out = tmp_path / "out"
    shutil.copytree(clean_run[0], out)
    shutil.rmtree(out / "_index")
    (out / "_manifests" / "shard-000002.json").unlink()
    (out / "latents" / "part-shard-000002-00000.parquet.tmp-0123").write_bytes(b"half")
    job(f"{shards}/shard-{{000000..000001}}.tar", out)
    assert not any(".tmp-" in name for name in os.listdir(out / "latents"))
    assert visible_shards(out) == {"shard-000000", "shard-000001"}


def test_changed_settings_are_refused_before_any_work(clean_run, shards):
    out, _ = clean_run
    before = files(out)
    from encoder_service.job.plan import JobError
    with pytest.raises(JobError, match="other settings.*size '32x32' -> '40x40'.*--overwrite"):
        job(f"{shards}/shard-000000.tar", out, "--size", "40x40")
    assert files(out) == before


def test_a_missing_shard_is_not_committed_and_is_encoded_once_it_appears(shards, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(shards / "shard-000000.tar", d / "shard-000000.tar")
    first = job(f"{d}/shard-{{000000..000001}}.tar", tmp_path / "out")
    assert first["shards_done"] == 1 and list(first["failed_shards"]) == ["shard-000001"]
    assert "cannot be opened" in first["failed_shards"]["shard-000001"]
    assert not (tmp_path / "out" / "_manifests" / "shard-000001.json").exists()
    shutil.copy(shards / "shard-000001.tar", d / "shard-000001.tar")  # uploaded later
    second = job(f"{d}/shard-{{000000..000001}}.tar", tmp_path / "out")
    assert second["shards_done"] == 1 and second["shards_skipped"] == 1 and second["shards_failed"] == 0


HOSTILE_ARGS = ("--clips-per-video", "first", "--max-pixels", "40000")  # hostile.py's expectations


def test_a_hostile_shard_is_committed_once_with_every_sample_accounted_for(tmp_path):
    from hostile import hostile_shard
    media = tmp_path / "media"
    media.mkdir()
    expected = hostile_shard(tmp_path / "shard-000009.tar", media)
    summary = job(tmp_path / "shard-000009.tar", tmp_path / "out", *HOSTILE_ARGS)
    assert summary["shards_done"] == 1 and summary["shards_failed"] == 0
    latents = pyarrow.dataset.dataset(str(tmp_path / "out" / "latents")).to_table().column("source_key").to_pylist()
    assert sorted(latents) == sorted(expected["good"])
    ledger = pyarrow.dataset.dataset(str(tmp_path / "out" / "errors")).to_table().to_pylist()
    got = sorted((r["key"].split("/", 1)[1] if "/" in r["key"] else "(shard)", r["reason"]) for r in ledger)
    assert got == sorted(expected["ledger"])
    before = files(tmp_path / "out")
    os.unlink(tmp_path / "out" / "_manifests" / "shard-000009.json")
    job(tmp_path / "shard-000009.tar", tmp_path / "out", *HOSTILE_ARGS)
    assert files(tmp_path / "out") == before, "a redone shard, its ledger included, has the same bytes"


def test_credentials_are_scrubbed_from_everything_written(shards, tmp_path):
    job(f"{shards}/shard-000000.tar", tmp_path / "out", "--s3-endpoint-url", "http://AKIAKEY:s3cr3t@127.0.0.1:9")
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written and not any(b"s3cr3t" in p.read_bytes() for p in written)
    assert b"http://***@127.0.0.1:9" in (tmp_path / "out" / "summary.json").read_bytes()


def test_a_password_in_an_input_url_is_in_nothing_written(shards, tmp_path):
    """An input served over HTTP with Basic credentials in its URL: read with them, written without
    them. Every file of the folder is searched, Parquet files by their decoded values (their pages
    are compressed, so the raw bytes alone would prove nothing)."""
    from httpserver import serve
    secret = "s3cretPW-9f2"
    with serve(str(shards), "alice", secret) as base:
        url = base.replace("http://", f"http://alice:{secret}@") + "/shard-000000.tar"
        summary = job(url, tmp_path / "out")
    assert summary["shards_done"] == 1 and summary["latents"] == CLIPS_PER_SHARD
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
        if path.suffix == ".parquet":
            assert secret not in json.dumps(pq.read_table(path).to_pylist(), default=str), path
    row = pq.read_table(tmp_path / "out" / "latents" / "part-shard-000000-00000.parquet").to_pylist()[0]
    assert row["source_url"] == base.replace("http://", "http://***@") + "/shard-000000.tar"


def visible_shards(out) -> set[str]:
    """Shards whose latents a plain Parquet reader of latents/ sees."""
    keys = pyarrow.dataset.dataset(str(out / "latents")).to_table().column("key").to_pylist()
    return {k.split("/")[0] for k in keys}


def test_a_killed_driver_leaves_nothing_wrong_and_a_rerun_completes_identically(clean_run, shards, tmp_path):
    """SIGKILL the driver once a shard is committed: our reader reads exactly the committed shards, plain
    readers see at most the one shard whose commit the kill cut off (complete files of right latents),
    the next run's start removes that one, and the run completes the folder byte-identically."""
    import signal
    import subprocess
    import sys
    import time

    import ray
    out = tmp_path / "out"
    args = ["--input", f"{shards}/shard-{{000000..000002}}.tar", "--output", str(out), "--checkpoint", CKPT,
            "--num-frames", "9", "--size", "32x32", "--clips-per-video", "all", "--num-gpus", "0", "--precision",
            "fp32", "--batch-size", "2", "--metrics-linger-s", "0", "--lease-ttl-s", "4",
            "--ray-address", ray.get_runtime_context().gcs_address]  # a second driver on the tests' Ray
    proc = subprocess.Popen([sys.executable, "pipelines/encode_dataset.py", *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            (out / "_manifests").exists() and any((out / "_manifests").iterdir())):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    from encoder_service.job.plan import clean_leftovers
    from encoder_service.table.manifest import list_manifests
    from encoder_service.storage import filesystem
    committed = set(list_manifests(*filesystem(str(out))))  # (a manifest's temporary, if the kill hit one, is not one)
    assert committed, "the driver was killed after a commit"
    ours = {item["key"].split("/")[0] for item in LatentShardDataset(str(out))}
    assert ours == committed
    assert committed <= visible_shards(out) and len(visible_shards(out) - committed) <= 1
    clean_leftovers(*filesystem(str(out)))  # what the next run does first
    assert visible_shards(out) == committed
    from encoder_service.table.lease import Lease, LeaseError
    deadline = time.time() + 60
    while True:  # the killed driver's lease expires 4 s after its last renewal
        try:
            Lease.acquire(*filesystem(str(out))).release()
            break
        except LeaseError:
            assert time.time() < deadline, "the killed driver's lease never expired"
            time.sleep(0.2)
    again = job(f"{shards}/shard-{{000000..000002}}.tar", out)
    assert again["shards_done"] + again["shards_skipped"] == 3
    assert files(out) == files(clean_run[0])
