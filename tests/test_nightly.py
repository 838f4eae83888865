"""A nightly run at the size users run: planning from listings (requests counted on the moto
server), the folder index and its repair, one run per folder (the lease: real runs, SIGKILL,
expiry, odd lease files), changed inputs encoded again, schema-2 folders read as they are."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import GOLDEN
from services import make_bucket, s3_server  # noqa: F401

from benchmarks import synthetic_folder
from encoder_service.job.config import fingerprint, load_config
from encoder_service.job.plan import JobError, model_identity, prepare
from encoder_service.records import ChannelStats, FolderTotals
from encoder_service.samples import write_tar, write_video
from encoder_service.table import index as folder_index
from encoder_service.table import layout, totals
from encoder_service.table.lease import Holder, Lease, LeaseError
from encoder_service.storage import NotAtomic, filesystem, put_if_absent

CKPT = str(GOLDEN / "weights.safetensors")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_ARGS = ["--checkpoint", CKPT, "--num-frames", "9", "--size", "32x32", "--clips-per-video", "all",
            "--num-gpus", "0", "--precision", "fp32", "--batch-size", "2", "--progress-every-s", "1000",
            "--metrics-linger-s", "0"]


def config(inputs: str, output: str, *extra):
    return load_config(["--input", inputs, "--output", output, *JOB_ARGS, *extra])


def folder_fingerprint(cfg) -> str:
    model, digest, _ = model_identity(cfg)
    return fingerprint(cfg.latent_settings(digest, model.to_dict()))


def plan_once(cfg):
    plan = prepare(cfg)
    plan.lease.release()
    return plan


# ---- planning from listings ----------------------------------------------------------------------
def test_planning_costs_listings_not_requests_per_shard(s3_server, monkeypatch):  # noqa: F811
    """1,500 committed shards and 500 new ones on the moto server: a few dozen requests in all
    (listings of 1,000 keys, the index segment, settings and lease), not one per shard."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    storage = s3_server.storage
    bucket = make_bucket(storage, "nightly")
    urls = synthetic_folder.input_urls(f"{bucket}/in", 2000)
    synthetic_folder.write_inputs(urls, storage)
    cfg = config(f"{bucket}/in/shard-{{0000000..0001999}}.tar", f"{bucket}/out", "--s3-endpoint-url",
                 s3_server.endpoint)
    fp = folder_fingerprint(cfg)
    synthetic_folder.write_committed(f"{bucket}/out", urls[:1500], fp, synthetic_folder.run_meta(fp), storage)
    before = s3_server.requests()
    plan = plan_once(cfg)
    requests = s3_server.requests() - before
    assert plan.skipped == 1500 and len(plan.todo) == 500 and plan.why == {"new": 500}
    assert requests <= 0.05 * 2000, f"{requests} requests for 2,000 shards"
    assert plan.history.shards == 1500 and plan.history.clips == 150000


def test_manifests_the_index_does_not_cover_are_read_once_then_indexed(tmp_path):
    """A run killed before its index segment was written: its manifests are read (one request
    each), indexed by the next run, and the run after reads none; the totals are the same."""
    urls = synthetic_folder.input_urls(str(tmp_path / "in"), 300)
    synthetic_folder.write_inputs(urls)
    cfg = config(f"{tmp_path}/in/shard-{{0000000..0000299}}.tar", str(tmp_path / "out"))
    fp = folder_fingerprint(cfg)
    synthetic_folder.write_committed(str(tmp_path / "out"), urls[:200], fp, synthetic_folder.run_meta(fp))
    synthetic_folder.write_committed(str(tmp_path / "out"), urls[200:250], fp, synthetic_folder.run_meta(fp),
                                     indexed=False)
    fs, root = filesystem(str(tmp_path / "out"))
    scanned = folder_index.scan(fs, root)
    assert len(scanned.shards) == 250 and len(scanned.unindexed) == 50
    plan = plan_once(cfg)
    assert plan.skipped == 250 and len(plan.todo) == 50
    again = folder_index.scan(fs, root)
    assert len(again.shards) == 250 and not again.unindexed and len(again.segments) == 2
    kept, _ = folder_index.folder_totals(fs, root, again)
    assert kept.shards == 250 and kept.ledger_reasons == {"probe/corrupt": 250}


def test_a_rewritten_manifest_is_not_described_by_its_old_index_row(tmp_path):
    """The index never lies: a manifest changed after its row was written is read again."""
    urls = synthetic_folder.input_urls(str(tmp_path / "in"), 20)
    synthetic_folder.write_inputs(urls)
    synthetic_folder.write_committed(str(tmp_path / "out"), urls, "fp1", synthetic_folder.run_meta("fp1"))
    path = tmp_path / "out" / layout.manifest_name("shard-0000003")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "settings": "fp2"}, indent=1, sort_keys=True))
    scanned = folder_index.scan(*filesystem(str(tmp_path / "out")))
    assert scanned.shards["shard-0000003"].settings == "fp2" and scanned.shards["shard-0000004"].settings == "fp1"
    assert [r.shard_id for r in scanned.unindexed] == ["shard-0000003"]


def test_many_segments_are_compacted_into_one_with_the_same_totals(tmp_path):
    urls = synthetic_folder.input_urls(str(tmp_path / "in"), 40)
    synthetic_folder.write_inputs(urls)
    out = str(tmp_path / "out")
    for i in range(folder_index.MAX_SEGMENTS + 4):  # more segments than allowed, some rows rewritten
        synthetic_folder.write_committed(out, urls[2 * i:2 * i + 4], "fp", synthetic_folder.run_meta("fp"))
    fs, root = filesystem(out)
    scanned = folder_index.scan(fs, root)
    before, _ = folder_index.folder_totals(fs, root, scanned)
    folder_index.repair(fs, root, scanned)
    again = folder_index.scan(fs, root)
    after, _ = folder_index.folder_totals(fs, root, again)
    assert len(again.segments) == 1 and after.shards == before.shards == 40
    assert_same_totals(after, before)


def assert_same_totals(a: FolderTotals, b: FolderTotals) -> None:
    """Equal counts; statistics to 1e-12 relative (sums taken in another order)."""
    assert dataclasses.replace(a, stats=None) == dataclasses.replace(b, stats=None)
    for kind in ("mean", "logvar"):
        x, y = getattr(a.stats, kind), getattr(b.stats, kind)
        assert x.count == y.count
        assert x.sum == pytest.approx(y.sum, rel=1e-12) and x.sum_sq == pytest.approx(y.sum_sq, rel=1e-12)


def test_totals_merged_per_shard_equal_totals_over_all_manifests(tmp_path):
    """The index's vectorised totals, the driver's one-shard-at-a-time merge and a sum over every
    manifest agree (statistics to 1e-12 relative; QA p99 within one histogram bin)."""
    urls = synthetic_folder.input_urls(str(tmp_path / "in"), 60)
    synthetic_folder.write_inputs(urls)
    out = str(tmp_path / "out")
    synthetic_folder.write_committed(out, urls, "fp", synthetic_folder.run_meta("fp"))
    fs, root = filesystem(out)
    from encoder_service.table.manifest import read_manifest
    manifests = [read_manifest(fs, root, u.rsplit("/", 1)[1][:-4]) for u in urls]
    merged = FolderTotals()
    for m in manifests:
        totals.add_shard(merged, totals.shard_record(m, 0, ""))
    vectorised, _ = folder_index.folder_totals(fs, root, folder_index.scan(fs, root))
    assert vectorised.shards == merged.shards == 60
    assert_same_totals(vectorised, merged)
    drifts = sorted(q.drift_mean for m in manifests for q in m.qa)
    exact_p99 = drifts[min(len(drifts) - 1, int(0.99 * len(drifts)))]
    sketch_p99 = totals.qa_report(merged.qa)["drift_mean"]["p99"]
    assert exact_p99 <= sketch_p99 <= exact_p99 * 10 ** (1 / totals.SKETCH_BINS_PER_DECADE) * 1.0001


def test_inspect_of_a_large_folder_into_a_closed_pipe_is_quiet(tmp_path):
    """`inspect --json | head`: the reader closes the pipe early; no traceback, exit 0 (5,000
    shards: a report larger than the pipe's buffer)."""
    urls = synthetic_folder.input_urls(str(tmp_path / "in"), 5000)
    synthetic_folder.write_inputs(urls)
    synthetic_folder.write_committed(str(tmp_path / "out"), urls, "fp", synthetic_folder.run_meta("fp"))
    result = subprocess.run(f"{sys.executable} -m encoder_service inspect {tmp_path / 'out'} --json | head -c 100",
                            shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and len(result.stdout) == 100 and "Traceback" not in result.stderr, result.stderr


# ---- the lease -----------------------------------------------------------------------------------
def test_the_lease_is_exclusive_renewed_released_and_taken_over_when_expired(tmp_path):
    fs, root = filesystem(str(tmp_path / "out"))
    first = Lease.acquire(fs, root, ttl_s=2.0)
    with pytest.raises(LeaseError, match=f"in use by another run \\(host .*, pid {os.getpid()}"):
        Lease.acquire(fs, root, ttl_s=2.0)
    first.renew()
    assert first.valid()
    first.release()
    second = Lease.acquire(fs, root, ttl_s=1.0)  # released: free at once
    assert second.generation == first.generation + 1
    time.sleep(1.2)                              # never renewed: expired
    third = Lease.acquire(fs, root, ttl_s=1.0)
    second.renew()                               # the old holder learns it lost the folder
    assert not second.valid() and "taken by another run" in second.lost
    assert third.valid()
    third.release()
    assert sorted(os.listdir(tmp_path / "out" / layout.LEASE)) == [f"{third.generation:012d}.json"]


def test_the_lease_on_s3_is_a_conditional_put(s3_server):  # noqa: F811
    storage = s3_server.storage
    bucket = make_bucket(storage, "lease")
    fs, root = filesystem(f"{bucket}/out", storage)
    assert put_if_absent(fs, f"{root}/x", b"1") and not put_if_absent(fs, f"{root}/x", b"2")
    assert fs.cat_file(f"{root}/x") == b"1"
    holder = Holder("elsewhere", 7, "raysubmit_1", 0.0)
    lease = Lease.acquire(fs, root, ttl_s=60, holder=holder)
    with pytest.raises(LeaseError, match="host elsewhere, pid 7, Ray job raysubmit_1"):
        Lease.acquire(fs, root)
    lease.release()
    Lease.acquire(fs, root).release()


def test_a_store_without_atomic_create_is_refused():
    fs, root = filesystem("memory://wfvae-lease-test/out")
    with pytest.raises(NotAtomic):
        put_if_absent(fs, f"{root}/x", b"1")
    with pytest.raises(LeaseError, match="cannot create a file only if it is absent"):
        Lease.acquire(fs, root)


def test_a_lease_file_that_is_not_ours_is_one_line_and_nothing_is_touched(tmp_path):
    (tmp_path / "out" / layout.LEASE).mkdir(parents=True)
    (tmp_path / "out" / layout.LEASE / "000000000001.json").write_text("locked by bob")
    result = _encode(tmp_path / "in-none.tar", tmp_path / "out", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "is not a lease of this service" in result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == [layout.LEASE]


# ---- real runs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """Three shards of three short videos."""
    d = tmp_path_factory.mktemp("night")
    for s in range(3):
        _shard(d / f"shard-{s:06d}.tar", d, s, videos=3)
    return d


def _shard(path, folder, s: int, videos: int):
    media = folder / "media"
    media.mkdir(exist_ok=True)
    samples = [(f"v{v}", {"mp4": write_video(media / f"{s}{v}.mp4", frames=12 + 4 * v, h=32, w=40).read_bytes(),
                          "json": json.dumps({"caption": f"{s}-{v}-{videos}"}).encode()}) for v in range(videos)]
    write_tar(path, samples)


def _encode(inputs, out, *extra, check=True, ray_address=None, popen=False):
    import ray
    address = ray_address or (ray.get_runtime_context().gcs_address if ray.is_initialized() else None)
    args = [sys.executable, "pipelines/encode_dataset.py", "--input", str(inputs), "--output", str(out), *JOB_ARGS,
            *(["--ray-address", address] if address else []), *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if popen:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _files(out) -> dict[str, bytes]:
    found = {}
    for folder in ("latents", "errors", "_manifests"):
        for name in sorted(os.listdir(os.path.join(out, folder))):
            found[f"{folder}/{name}"] = open(os.path.join(out, folder, name), "rb").read()
    return found


@pytest.mark.slow
def test_without_num_gpus_a_cluster_without_gpus_encodes_on_the_cpu_and_says_so(night, tmp_path):
    """A local Ray of its own (this machine has no GPU), no --num-gpus: one line, CPU encoders, done."""
    at = JOB_ARGS.index("--num-gpus")
    args = JOB_ARGS[:at] + JOB_ARGS[at + 2:]
    result = subprocess.run([sys.executable, "pipelines/encode_dataset.py", "--input", f"{night}/shard-000000.tar",
                             "--output", str(tmp_path / "out"), *args, "--ray-address", "local"], cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the cluster has no GPU and no autoscaler that adds any: encoding on the CPU" in result.stdout
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["last_run"]["config"]["num_gpus"] == 0


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_two_runs_started_at_once_one_encodes_the_other_exits_2(night, tmp_path):
    inputs = f"{night}/shard-{{000000..000002}}.tar"
    runs = [_encode(inputs, tmp_path / "out", popen=True) for _ in range(2)]
    results = [(p.wait(600), *p.communicate()) for p in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert refused.strip().count("\n") == 0 and "in use by another run (host" in refused
    _encode(inputs, tmp_path / "clean")
    assert _files(tmp_path / "out") == _files(tmp_path / "clean")


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_killed_holders_lease_expires_and_the_next_run_takes_over(night, tmp_path):
    """SIGKILL a run holding the lease (ttl 4 s): a run at once is refused (exit 2, before Ray, in
    seconds); once the lease has expired the next run takes over, cleans up, and completes."""
    inputs, out = f"{night}/shard-{{000000..000002}}.tar", tmp_path / "out"
    proc = _encode(inputs, out, "--lease-ttl-s", "4", popen=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / layout.STAGING).exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    start = time.time()
    refused = _encode(inputs, out, check=False)
    assert refused.returncode == 2 and "in use by another run" in refused.stderr and time.time() - start < 30
    time.sleep(4.5)
    taken = _encode(inputs, out, "--lease-ttl-s", "4")
    assert "took over" in taken.stdout
    _encode(inputs, tmp_path / "clean")
    assert _files(out) == _files(tmp_path / "clean")


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_changed_input_is_encoded_again_and_its_old_files_replaced(night, tmp_path):
    """A shard rewritten under its name after it was committed (fewer videos: fewer files) is
    re-encoded, its stale files go, and the folder equals one made from the new inputs."""
    from encoder_service.job.run import run_job
    d = tmp_path / "in"
    shutil.copytree(night, d, ignore=shutil.ignore_patterns("media"))
    inputs, out = f"{d}/shard-{{000000..000002}}.tar", tmp_path / "out"
    first = run_job(config(inputs, str(out), "--file-mb", "0.002"))
    assert first["shards_done"] == 3
    old_files = [f["name"] for f in json.loads((out / "_manifests" / "shard-000001.json").read_text())["files"]]
    _shard(d / "shard-000001.tar", tmp_path, 1, videos=1)
    second = run_job(config(inputs, str(out), "--file-mb", "0.002"))
    assert second["shards_done"] == 1 and second["shards_skipped"] == 2 and second["shards_by_reason"] == {"changed": 1}
    manifest = json.loads((out / "_manifests" / "shard-000001.json").read_text())
    assert manifest["input"]["size"] == os.path.getsize(d / "shard-000001.tar")
    assert len(manifest["files"]) < len(old_files)
    assert not any(os.path.exists(out / n) for n in set(old_files) - {f["name"] for f in manifest["files"]})
    assert run_job(config(inputs, str(out), "--file-mb", "0.002"))["shards_done"] == 0
    run_job(config(inputs, str(tmp_path / "clean"), "--file-mb", "0.002"))
    assert _files(out) == _files(tmp_path / "clean")
    folder = json.loads((out / "summary.json").read_text())
    clean = json.loads((tmp_path / "clean" / "summary.json").read_text())
    assert {k: folder[k] for k in ("shards", "clips", "latents", "ledger_by_reason")} == {
        k: clean[k] for k in ("shards", "clips", "latents", "ledger_by_reason")}
    for kind in ("mean", "logvar"):  # merged in another order: equal to rounding
        for stat in ("count", "sum", "sum_sq"):
            assert folder["stats"][kind][stat] == pytest.approx(clean["stats"][kind][stat], rel=1e-9)


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_content_identity_ignores_a_touch_and_verify_finds_missing_files(night, tmp_path):
    from encoder_service.job.run import run_job
    d = tmp_path / "in"
    shutil.copytree(night, d, ignore=shutil.ignore_patterns("media"))
    inputs, out = f"{d}/shard-{{000000..000001}}.tar", tmp_path / "out"
    run_job(config(inputs, str(out), "--input-identity", "sha256"))
    before = _files(out)
    os.utime(d / "shard-000000.tar", (time.time() + 100, time.time() + 100))  # new mtime, same bytes
    same = run_job(config(inputs, str(out), "--input-identity", "sha256"))
    assert same["shards_done"] == 0 and same["shards_skipped"] == 2
    os.unlink(out / "latents" / "part-shard-000001-00000.parquet")   # a manifest without its files
    assert run_job(config(inputs, str(out), "--input-identity", "sha256"))["shards_done"] == 0  # trusted
    redone = run_job(config(inputs, str(out), "--input-identity", "sha256", "--verify-existing", "size"))
    assert redone["shards_done"] == 1 and redone["shards_by_reason"] == {"incomplete": 1}
    assert _files(out) == before


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_folder_of_schema_2_is_planned_and_indexed(night, tmp_path):
    """Manifests as the previous version wrote them (scale/shift as JSON strings, statistics with
    mean/std, no input identity, no index): complete shards are skipped, and indexed."""
    from encoder_service.job.run import run_job
    inputs, out = f"{night}/shard-{{000000..000001}}.tar", tmp_path / "out"
    run_job(config(inputs, str(out)))
    shutil.rmtree(out / layout.INDEX)
    for path in (out / "_manifests").iterdir():
        m = json.loads(path.read_text())
        m["schema_version"], m["checkpoint_sha256"] = "2", m["run"]["vae_sha256"]
        m["run"] = {**m["run"], "scale": json.dumps(m["run"]["scale"]), "shift": json.dumps(m["run"]["shift"])}
        m["stats"] = {k: {**totals.channel_summary(ChannelStats(**v))} for k, v in m["stats"].items()}
        del m["input"]
        path.write_text(json.dumps(m))
    record = run_job(config(inputs, str(out)))
    assert record["shards_skipped"] == 2 and record["shards_done"] == 0
    assert len(folder_index.scan(*filesystem(str(out))).unindexed) == 0
    assert json.loads((out / "summary.json").read_text())["shards"] == 2


def test_an_interrupted_plan_releases_the_lease(tmp_path):
    """A mistake found after the lease was taken (other settings) leaves the folder free."""
    out = tmp_path / "out"
    out.mkdir()
    (out / layout.SETTINGS).write_text(json.dumps({"fingerprint": "other", "settings": {"size": "64x64"}}))
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(JobError, match="other settings"):
        prepare(config(str(tmp_path / "x.tar"), str(out)))
    Lease.acquire(*filesystem(str(out))).release()
