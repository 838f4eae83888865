"""A nightly run at the size users run: planning from the folder's Delta logs (requests counted on
the moto server), group commits, one run per folder (the lease: real runs, SIGKILL, --break-lease,
odd lease files, NaN), changed inputs encoded again, folders of the older layout migrated."""
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import GOLDEN
from services import make_bucket, s3_server  # noqa: F401
from tables import latent_rows, records, snapshot

from benchmarks import synthetic_folder
from encoder_service.job.config import fingerprint, load_config
from encoder_service.job.plan import JobError, model_identity, prepare
from encoder_service.records import FolderTotals
from encoder_service.samples import write_tar, write_video
from encoder_service.storage import NotAtomic, put_if_absent
from encoder_service.table import layout, totals
from encoder_service.table.folder import OutputFolder
from encoder_service.table.lease import Holder, Lease, LeaseError

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


def settings_of(cfg) -> dict:
    model, digest, _ = model_identity(cfg)
    return cfg.latent_settings(digest, model.to_dict())


# ---- planning from the log -----------------------------------------------------------------------
def test_planning_reads_the_log_not_objects_per_shard(s3_server, monkeypatch):  # noqa: F811
    """1,500 committed shards and 500 new ones on the moto server: the two tables' logs (a checkpoint
    each and the commits after it), the input listing (2 pages), settings and lease; no request per
    shard."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    storage = s3_server.storage
    bucket = make_bucket(storage, "nightly")
    urls = synthetic_folder.input_urls(f"{bucket}/in", 2000)
    synthetic_folder.write_inputs(urls, storage)
    cfg = config(f"{bucket}/in/shard-{{0000000..0001999}}.tar", f"{bucket}/out", "--s3-endpoint-url",
                 s3_server.endpoint)
    fp = folder_fingerprint(cfg)
    synthetic_folder.table_folder(f"{bucket}/out", fp, storage, settings_of(cfg))
    synthetic_folder.commit_synthetic(f"{bucket}/out", urls[:1500], fp, synthetic_folder.run_meta(fp), storage,
                                      group=500)
    before = s3_server.requests()
    plan = plan_once(cfg)
    requests = s3_server.requests() - before
    assert plan.skipped == 1500 and len(plan.todo) == 500 and plan.why == {"new": 500}
    print(f"planning: {requests} requests")
    assert requests <= 60, f"{requests} requests for 2,000 shards"
    assert plan.history.shards == 1500 and plan.history.clips == 151500  # 100 latents + 1 ledger row each


def test_the_shards_table_is_compacted_with_the_same_totals(tmp_path):
    """Many group commits (and a shard redone) leave many small files in _shards/: the end of a run
    rewrites its current records as one file; the totals and each shard's current record stay."""
    urls = synthetic_folder.input_urls(str(tmp_path / "in"), 40)
    out = str(tmp_path / "out")
    run = synthetic_folder.run_meta("fp")
    for i in range(12):  # more files than SHARDS_FILES_BEFORE_COMPACTION, some shards committed twice
        synthetic_folder.commit_synthetic(out, urls[3 * i:3 * i + 4], "fp", run, group=2)
    folder = OutputFolder(out)
    before, rows = totals.records_totals(folder.records()), records(out)
    assert len(folder.shards().file_uris()) > 20
    folder.finish(retention_hours=0)
    assert len(folder.shards().file_uris()) == 1
    assert_same_totals(totals.records_totals(folder.records()), before)
    assert records(out) == rows and before.shards == 37


def assert_same_totals(a: FolderTotals, b: FolderTotals) -> None:
    """Equal counts; statistics to 1e-12 relative (sums taken in another order)."""
    assert dataclasses.replace(a, stats=None) == dataclasses.replace(b, stats=None)
    for kind in ("mean", "logvar"):
        x, y = getattr(a.stats, kind), getattr(b.stats, kind)
        assert x.count == y.count
        assert x.sum == pytest.approx(y.sum, rel=1e-12) and x.sum_sq == pytest.approx(y.sum_sq, rel=1e-12)


def test_totals_merged_per_shard_equal_the_vectorised_totals(tmp_path):
    """The shards table's vectorised totals and the driver's one-shard-at-a-time merge agree
    (statistics to 1e-12 relative; QA p99 within one histogram bin)."""
    from encoder_service.records import ShardRecord, from_dict
    urls = synthetic_folder.input_urls(str(tmp_path / "in"), 60)
    out = str(tmp_path / "out")
    synthetic_folder.commit_synthetic(out, urls, "fp", synthetic_folder.run_meta("fp"))
    table = OutputFolder(out).records()
    merged = FolderTotals()
    for row in table.to_pylist():
        totals.add_shard(merged, from_dict(ShardRecord, row))
    vectorised = totals.records_totals(table)
    assert vectorised.shards == merged.shards == 60
    assert_same_totals(vectorised, merged)
    assert totals.qa_report(vectorised.qa)["drift_mean"]["p99"] == totals.qa_report(merged.qa)["drift_mean"]["p99"]


def test_inspect_of_a_large_folder_into_a_closed_pipe_is_quiet(tmp_path):
    """`inspect --json | head`: the reader closes the pipe early; no traceback, exit 0 (5,000
    shards: a report larger than the pipe's buffer)."""
    urls = synthetic_folder.input_urls(str(tmp_path / "in"), 5000)
    synthetic_folder.commit_synthetic(str(tmp_path / "out"), urls, "fp", synthetic_folder.run_meta("fp"))
    result = subprocess.run(f"{sys.executable} -m encoder_service inspect {tmp_path / 'out'} --json | head -c 100",
                            shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and len(result.stdout) == 100 and "Traceback" not in result.stderr, result.stderr


# ---- the lease -----------------------------------------------------------------------------------
def test_the_lease_is_exclusive_renewed_released_and_taken_over_when_expired(tmp_path):
    folder = OutputFolder(str(tmp_path / "out"))
    first = Lease.acquire(folder, ttl_s=2.0)
    with pytest.raises(LeaseError, match=f"in use by another run \\(host .*, pid {os.getpid()}.*--break-lease 1"):
        Lease.acquire(folder, ttl_s=2.0)
    first.renew()
    assert first.valid()
    first.release()
    second = Lease.acquire(folder, ttl_s=1.0)  # released: free at once
    assert second.generation == first.generation + 1
    time.sleep(1.2)                            # never renewed: expired
    third = Lease.acquire(folder, ttl_s=1.0)
    second.renew()                             # the old holder learns it lost the folder
    assert not second.valid() and "taken by another run" in second.lost
    assert third.valid()
    third.release()
    assert sorted(os.listdir(tmp_path / "out" / layout.LEASE)) == [f"{third.generation:012d}.json"]


def test_a_holder_whose_process_is_gone_is_taken_over_at_once_and_break_lease_names_its_generation(tmp_path):
    folder = OutputFolder(str(tmp_path / "out"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    Lease.acquire(folder, ttl_s=600, holder=Holder(socket.gethostname(), dead.pid, None, time.time()))
    taken = Lease.acquire(folder, ttl_s=600)  # its pid is gone on this host: no waiting for the ttl
    assert taken.generation == 2
    taken.release()  # a live holder on another host: only --break-lease takes it
    Lease.acquire(folder, ttl_s=600, holder=Holder("elsewhere", 1, None, time.time()))
    with pytest.raises(LeaseError, match="--break-lease 3"):
        Lease.acquire(folder)
    with pytest.raises(LeaseError, match="at generation 3, not 2; nothing was broken"):
        Lease.acquire(folder, breaking=2)
    broken = Lease.acquire(folder, breaking=3)
    assert broken.generation == 4 and broken.valid()
    broken.release()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_lease_ttl_that_is_not_a_number_of_seconds_is_a_usage_error(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        config("x.tar", str(tmp_path), f"--lease-ttl-s={value}")
    assert exit_.value.code == 2 and "lease ttl must be a finite number" in capsys.readouterr().err
    with pytest.raises(LeaseError, match="positive number"):
        Lease(None, 1, Holder("h", 1, None, 0.0), float(value))
    assert not math.isfinite(float(value))


def test_the_lease_on_s3_is_a_conditional_put(s3_server):  # noqa: F811
    storage = s3_server.storage
    bucket = make_bucket(storage, "lease")
    folder = OutputFolder(f"{bucket}/out", storage)
    fs, root = folder.fs, folder.root
    assert put_if_absent(fs, f"{root}/x", b"1") and not put_if_absent(fs, f"{root}/x", b"2")
    assert fs.cat_file(f"{root}/x") == b"1"
    holder = Holder("elsewhere", 7, "raysubmit_1", 0.0)
    lease = Lease.acquire(folder, ttl_s=60, holder=holder)
    with pytest.raises(LeaseError, match="host elsewhere, pid 7, Ray job raysubmit_1"):
        Lease.acquire(folder)
    lease.release()
    Lease.acquire(folder).release()


def test_a_store_without_atomic_create_is_refused():
    folder = OutputFolder("memory://wfvae-lease-test/out")
    with pytest.raises(NotAtomic):
        put_if_absent(folder.fs, f"{folder.root}/x", b"1")
    with pytest.raises(LeaseError, match="cannot create a file only if it is absent"):
        Lease.acquire(folder)


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


def _files(out) -> dict:
    return snapshot(out)


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
    assert json.loads((tmp_path / "out" / layout.SUMMARY).read_text())["last_run"]["config"]["num_gpus"] == 0


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
def test_a_killed_holder_on_this_host_is_taken_over_at_once(night, tmp_path):
    """SIGKILL a run holding the lease (ttl 600 s) while it encodes: the next run on this host sees
    the holder's process gone, takes over at once (no waiting for the ttl) and completes the folder
    as a clean run does."""
    inputs, out = f"{night}/shard-{{000000..000002}}.tar", tmp_path / "out"
    proc = _encode(inputs, out, popen=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / layout.LATENTS).exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    start = time.time()
    taken = _encode(inputs, out)
    assert "took over" in taken.stdout and "its process is gone" in taken.stdout
    assert time.time() - start < 120
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
    old_files = [f["name"] for f in records(out)["shard-000001"]["files"]]
    _shard(d / "shard-000001.tar", tmp_path, 1, videos=1)
    second = run_job(config(inputs, str(out), "--file-mb", "0.002"))
    assert second["shards_done"] == 1 and second["shards_skipped"] == 2 and second["shards_by_reason"] == {"changed": 1}
    record = records(out)["shard-000001"]
    assert record["input"]["size"] == os.path.getsize(d / "shard-000001.tar")
    assert len(record["files"]) < len(old_files)
    assert not set(old_files) & set(_files(out)["files"]), "the old files are removed in the same commit"
    assert run_job(config(inputs, str(out), "--file-mb", "0.002"))["shards_done"] == 0
    run_job(config(inputs, str(tmp_path / "clean"), "--file-mb", "0.002"))
    assert _files(out) == _files(tmp_path / "clean")
    folder = json.loads((out / layout.SUMMARY).read_text())
    clean = json.loads((tmp_path / "clean" / layout.SUMMARY).read_text())
    assert {k: folder[k] for k in ("shards", "clips", "latents", "ledger_by_reason")} == {
        k: clean[k] for k in ("shards", "clips", "latents", "ledger_by_reason")}
    for kind in ("mean", "logvar"):  # merged in another order: equal to rounding
        for stat in ("count", "sum", "sum_sq"):
            assert folder["stats"][kind][stat] == pytest.approx(clean["stats"][kind][stat], rel=1e-9)


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_content_identity_sees_a_same_size_rewrite_and_verify_finds_missing_files(night, tmp_path):
    """--input-identity sha256: a touch (new mtime, same bytes) changes nothing; a rewrite of the same
    size with the mtime put back is encoded again. --verify-existing size finds a missing data file."""
    from encoder_service.job.run import run_job
    d = tmp_path / "in"
    shutil.copytree(night, d, ignore=shutil.ignore_patterns("media"))
    inputs, out = f"{d}/shard-{{000000..000001}}.tar", tmp_path / "out"
    run_job(config(inputs, str(out), "--input-identity", "sha256"))
    before = _files(out)
    os.utime(d / "shard-000000.tar", (time.time() + 100, time.time() + 100))  # new mtime, same bytes
    same = run_job(config(inputs, str(out), "--input-identity", "sha256"))
    assert same["shards_done"] == 0 and same["shards_skipped"] == 2
    path = d / "shard-000001.tar"
    st, data = path.stat(), bytearray(path.read_bytes())
    data[-2000] ^= 0x01  # inside the tar's zero padding: same size, other bytes
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = run_job(config(inputs, str(out), "--input-identity", "sha256"))
    assert changed["shards_by_reason"] == {"changed": 1}
    (out / sorted(before["files"])[-1]).unlink()   # a record without its file
    sha = ("--input-identity", "sha256")
    assert run_job(config(inputs, str(out), *sha))["shards_done"] == 0  # trusted
    redone = run_job(config(inputs, str(out), *sha, "--verify-existing", "size"))
    assert redone["shards_done"] == 1 and redone["shards_by_reason"] == {"incomplete": 1}
    assert _files(out)["files"] == before["files"]  # (the rewritten input's record has its new identity)


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_folder_of_the_older_layout_is_refused_then_migrated(night, tmp_path):
    """A folder as schema 3 wrote it (manifests, ledgers in errors/, an index, _settings.json): the
    job refuses it in one line naming `migrate`; `migrate` makes it a table in place (twice: no
    change), and the job then finds every shard complete; the rows are the same."""
    from encoder_service.job.run import run_job
    inputs, out = f"{night}/shard-{{000000..000001}}.tar", tmp_path / "out"
    run_job(config(inputs, str(out)))
    rows = sorted((r["key"], r["mean"]) for r in latent_rows(out, ["key", "mean"]))
    _to_schema_3(out)
    with pytest.raises(JobError, match="written before output folders became Delta tables.*migrate"):
        prepare(config(inputs, str(out)))
    result = subprocess.run([sys.executable, "-m", "encoder_service", "migrate", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "2 shards moved into the table" in result.stdout, result.stderr
    again = subprocess.run([sys.executable, "-m", "encoder_service", "migrate", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    record = run_job(config(inputs, str(out)))
    assert record["shards_skipped"] == 2 and record["shards_done"] == 0
    assert sorted(os.listdir(out)) == sorted(["_delta_log", "_shards", "_lease", "_runs", "latents", "_summary.json"])
    assert sorted((r["key"], r["mean"]) for r in latent_rows(out, ["key", "mean"])) == rows


def _to_schema_3(out) -> None:
    """The folder as the previous version left it: the same data files under unhashed names."""
    recs = records(out)
    settings = OutputFolder(str(out)).settings(OutputFolder(str(out)).latents())
    for sid, r in recs.items():
        files = []
        for u, f in enumerate(r["files"]):
            name = f"{layout.LATENTS}/part-{sid}-{u:05d}.parquet"
            os.replace(out / f["name"], out / name)
            files.append({**{k: f[k] for k in ("rows", "bytes", "sha256")}, "name": name})
        (out / "errors").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(r["ledger"]), out / "errors" / f"errors-{sid}.parquet")
        (out / "_manifests").mkdir(exist_ok=True)
        manifest = {"schema_version": "3", "shard_id": sid, "settings": r["settings"],
                    "run": {"vae_sha256": r["checkpoint_sha256"], "settings": r["settings"]},
                    "source_url": r["source_url"], "input": r["input"], "clips": r["clips"], "latents": r["latents"],
                    "ledger_reasons": dict(r["ledger_reasons"]), "non_finite_rejected": 0,
                    "stats": {k: {c: r["stats"][k][c] for c in ("count", "sum", "sum_sq")} for k in ("mean", "logvar")},
                    "qa": [], "files": files, "errors": {"name": f"errors/errors-{sid}.parquet"}}
        (out / "_manifests" / f"{sid}.json").write_text(json.dumps(manifest))
    (out / "_settings.json").write_text(json.dumps(settings))
    (out / "_index").mkdir()
    (out / "_index" / "seg-000000000001.parquet").write_bytes(b"not parquet")
    for name in ("_delta_log", "_shards"):
        shutil.rmtree(out / name)
    (out / layout.SUMMARY).rename(out / "summary.json")


def test_an_interrupted_plan_releases_the_lease(tmp_path):
    """A mistake found after the lease was taken (other settings) leaves the folder free."""
    out = tmp_path / "out"
    synthetic_folder.table_folder(str(out), "other", settings={"size": "64x64"})
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(JobError, match="other settings"):
        prepare(config(str(tmp_path / "x.tar"), str(out)))
    Lease.acquire(OutputFolder(str(out))).release()
