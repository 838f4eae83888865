"""The job's bookkeeping at the size users run: planning, the driver's commits, its memory.

    planning   seconds and requests per shard for folders of N committed shards: locally
               N = 10^3, 10^4, 10^5 (all complete, and N names of which 3,000 complete), on a moto
               S3 server over HTTP N = 10^3, 10^4 (requests counted from the server's log)
    driver     the driver thread's CPU per commit while the 10^2nd and the 10^4th shard commit
               (real commits into a local folder), and its Python heap per committed shard
    commits    commits per second of 10-file shards on the moto server (the bounded commit pool),
               and requests per commit
    10^6       the extrapolation of each to a night over a million shards

Folders are made by benchmarks/synthetic_folder.py (bookkeeping as a run leaves it; planning reads
nothing else). CPU figures of this machine; moto is a Python server, slower per request than S3.

    python -m benchmarks.bench_scale [--quick]

Writes benchmarks/results/scale_cpu.{json,png}.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchmarks import synthetic_folder
from benchmarks.common import RESULTS, axes, environment, save_plot, write_json
from encoder_service.job.config import fingerprint, load_config
from encoder_service.job.driver import Driver
from encoder_service.job.plan import model_identity, prepare
from encoder_service.records import DataFile, ShardEnd, StageRow, UnitResult
from encoder_service.table import layout
from encoder_service.storage import StorageOptions, filesystem, join

CKPT = str(Path(__file__).resolve().parents[1] / "tests" / "data" / "golden-small" / "weights.safetensors")
TARGETS = {"plan_1e5_names_local_s": 10.0, "plan_1e4_complete_moto_s": 30.0, "requests_per_shard_moto": 0.05,
           "plan_1e6_s3_extrapolated_s": 600.0, "local_ms_per_complete_shard": 0.05, "commits_per_s_moto": 20.0}


def job_config(inputs: str, output: str, endpoint: str | None = None):
    return load_config(["--input", inputs, "--output", output, "--checkpoint", CKPT, "--num-gpus", "0",
                        "--lease-ttl-s", "600", "--progress-every-s", "1000", "--metrics-linger-s", "0",
                        *(["--s3-endpoint-url", endpoint] if endpoint else [])])


def folder(base: str, n: int, complete: int, storage=None, endpoint=None, files_per_shard: int = 1):
    """(config, input URLs) for a folder of n input names of which `complete` are committed."""
    urls = synthetic_folder.input_urls(f"{base}/in", n)
    synthetic_folder.write_inputs(urls, storage)
    cfg = job_config(f"{base}/in/shard-{{0000000..{n - 1:07d}}}.tar", f"{base}/out", endpoint)
    model, digest, _ = model_identity(cfg)
    fp = fingerprint(cfg.latent_settings(digest, model.to_dict()))
    if complete:
        synthetic_folder.write_committed(f"{base}/out", urls[:complete], fp, synthetic_folder.run_meta(fp), storage,
                                         files_per_shard)
    return cfg, urls


def time_plan(cfg, requests=None) -> dict:
    before = requests() if requests else 0
    start = time.perf_counter()
    plan = prepare(cfg)
    seconds = time.perf_counter() - start
    plan.lease.release()
    out = {"seconds": round(seconds, 3), "todo": len(plan.todo), "complete": plan.skipped}
    if requests:
        out["requests"] = requests() - before
    return out


def plan_memory(cfg) -> int:
    tracemalloc.start()
    plan = prepare(cfg)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    plan.lease.release()
    return peak


def bench_local_planning(sizes) -> list[dict]:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            cfg, _ = folder(d, n, n)
            done = time_plan(cfg)
            memory = plan_memory(cfg)
        with tempfile.TemporaryDirectory() as d:
            cfg, _ = folder(d, n, min(3000, n))
            mixed = time_plan(cfg)
        rows.append({"shards": n, "all_complete_s": done["seconds"],
                     "ms_per_complete_shard": round(1000 * done["seconds"] / n, 4),
                     "names_3000_complete_s": mixed["seconds"], "plan_peak_heap_bytes_per_shard": memory // n})
        print(f"local   N={n:>7}: all complete {done['seconds']:.2f} s ({1000 * done['seconds'] / n:.4f} ms/shard), "
              f"3,000 complete {mixed['seconds']:.2f} s, heap {memory / n:.0f} B/shard", flush=True)
    return rows


class Moto:
    """moto_server on 127.0.0.1 with its request log."""

    def __enter__(self):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from services import free_port, wait_http
        self.log = tempfile.NamedTemporaryFile(suffix=".log", delete=False).name
        port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        self.endpoint = f"http://127.0.0.1:{port}"
        wait_http(self.endpoint + "/moto-api/")
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
        self.storage = StorageOptions(endpoint_url=self.endpoint)
        return self

    def requests(self) -> int:
        with open(self.log) as f:
            return sum(1 for line in f if " HTTP/1.1" in line)

    def bucket(self, name: str) -> str:
        fs, _ = filesystem(f"s3://{name}", self.storage)
        fs.mkdir(name)
        return f"s3://{name}"

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)
        os.unlink(self.log)


def bench_moto_planning(moto: Moto, sizes) -> list[dict]:
    rows = []
    for n in sizes:
        bucket = moto.bucket(f"plan-{n}")
        cfg, _ = folder(bucket, n, n, moto.storage, moto.endpoint)
        result = time_plan(cfg, moto.requests)
        rows.append({"shards": n, "seconds": result["seconds"], "requests": result["requests"],
                     "requests_per_shard": round(result["requests"] / n, 4),
                     "ms_per_shard": round(1000 * result["seconds"] / n, 4)})
        print(f"moto    N={n:>7}: {result['seconds']:.2f} s, {result['requests']} requests "
              f"({result['requests'] / n:.4f} per shard)", flush=True)
    return rows


def stage(fs, root: str, sid: str, units: int, payload: bytes) -> dict[str, bytes]:
    return {join(root, layout.staging_dir(sid), f"{u:05d}-bench.parquet"): payload for u in range(units)}


def rows_for(sid: str, url: str, units: int, size: int) -> list[StageRow]:
    results = [StageRow("result", sid, result=UnitResult(sid, u, 4, DataFile(
        f"{layout.staging_dir(sid)}/{u:05d}-bench.parquet", 4, size, "0" * 64), [], 0.1)) for u in range(units)]
    return [*results, StageRow("end", sid, end=ShardEnd(sid, url, units, 4 * units, []))]


def run_driver(cfg, storage, units: int, payload: bytes, checkpoints=(), commit_threads: int = 16,
               trace: bool = False) -> dict:
    """Commit every planned shard through a real Driver; the driver thread's CPU per commit in
    windows ending at each checkpoint, and (trace) its Python heap there."""
    plan = prepare(cfg)
    fs = plan.fs
    files = {}
    for _, sid in plan.todo:
        files.update(stage(fs, plan.root, sid, units, payload))
    synthetic_folder._put_many(fs, files)
    driver = Driver(plan, commit_threads=commit_threads)
    marks, window, cpu0, heap0 = {}, 100, time.thread_time(), 0
    if trace:
        tracemalloc.start()
        heap0 = tracemalloc.get_traced_memory()[0]
    wall = time.perf_counter()
    for i, (url, sid) in enumerate(plan.todo, 1):
        if i % window == 1:
            cpu0 = time.thread_time()
        for row in rows_for(sid, url, units, len(payload)):
            driver.add(row)
        if i in checkpoints:
            marks[i] = {"driver_cpu_ms_per_commit": round(1000 * (time.thread_time() - cpu0) / window, 3)}
            if trace:  # what stays: commits under way and index rows not yet written are transient
                driver.drain()
                driver.index.flush()
                marks[i]["heap_bytes"] = tracemalloc.get_traced_memory()[0] - heap0
    driver.close()
    wall = time.perf_counter() - wall
    if trace:
        tracemalloc.stop()
    plan.lease.release()
    return {"commits": driver.totals.shards_done, "failed": len(driver.totals.failed), "seconds": round(wall, 2),
            "commits_per_s": round(driver.totals.shards_done / wall, 2), "marks": marks}


def bench_driver(n: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cfg, _ = folder(d, n, 0)
        cpu = run_driver(cfg, None, 1, b"x" * 1024, checkpoints=(100, n))
    with tempfile.TemporaryDirectory() as d:
        cfg, _ = folder(d, n, 0)
        heap = run_driver(cfg, None, 1, b"x" * 1024, checkpoints=(1000, n), trace=True)
    per_shard = (heap["marks"][n]["heap_bytes"] - heap["marks"][1000]["heap_bytes"]) / (n - 1000)
    out = {"shards": n, "cpu_ms_per_commit_at_100": cpu["marks"][100]["driver_cpu_ms_per_commit"],
           f"cpu_ms_per_commit_at_{n}": cpu["marks"][n]["driver_cpu_ms_per_commit"],
           "local_commits_per_s": cpu["commits_per_s"], "heap_bytes_at_1000": heap["marks"][1000]["heap_bytes"],
           f"heap_bytes_at_{n}": heap["marks"][n]["heap_bytes"],
           "heap_bytes_per_committed_shard": round(per_shard, 1)}
    print(f"driver  {n} commits: CPU {out['cpu_ms_per_commit_at_100']} ms/commit at 100, "
          f"{out[f'cpu_ms_per_commit_at_{n}']} at {n}; heap {per_shard:.0f} B per committed shard", flush=True)
    return out


def bench_moto_commits(moto: Moto, n: int, files: int) -> dict:
    bucket = moto.bucket(f"commit-{n}")
    cfg, _ = folder(bucket, n, 0, moto.storage, moto.endpoint)
    cfg.file_mb = 0.01
    before = moto.requests()
    result = run_driver(cfg, moto.storage, files, b"x" * 4096, checkpoints=())
    total = moto.requests() - before
    staged_puts = n * files
    per_commit = (total - staged_puts) / n
    print(f"commits on moto: {n} shards of {files} files, {result['commits_per_s']} commits/s, "
          f"{per_commit:.1f} requests per commit (planning included)", flush=True)
    return {"shards": n, "files_per_shard": files, "commits_per_s": result["commits_per_s"],
            "seconds": result["seconds"], "requests_per_commit": round(per_commit, 2), "failed": result["failed"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not the figures)")
    args = p.parse_args(argv)
    local_sizes, moto_sizes, driver_n, commit_n = (([1000, 10_000, 100_000], [1000, 10_000], 10_000, 200)
                                                   if not args.quick else ([300, 1000], [300], 1200, 20))
    out = {"environment": environment("cpu"), "note": "CPU figures; moto is a local Python S3 server",
           "planning_local": bench_local_planning(local_sizes)}
    with Moto() as moto:
        out["planning_moto"] = bench_moto_planning(moto, moto_sizes)
        out["commits_moto"] = bench_moto_commits(moto, commit_n, 10)
    out["driver"] = bench_driver(driver_n)
    out["extrapolated_1e6"] = extrapolate(out)
    out["targets"] = targets(out)
    if not args.quick:
        write_json("scale_cpu", out)
        plot(out)
    for name, t in out["targets"].items():
        print(f"target {name}: {t['measured']} (target {t['target']}) {'met' if t['met'] else 'MISSED'}")


def extrapolate(out: dict) -> dict:
    local, moto = out["planning_local"][-1], out["planning_moto"][-1]
    return {"plan_local_all_complete_s": round(local["all_complete_s"] / local["shards"] * 1e6, 1),
            "plan_s3_all_complete_s": round(moto["seconds"] / moto["shards"] * 1e6, 1),
            "plan_s3_requests": round(moto["requests_per_shard"] * 1e6),
            "plan_heap_bytes": local["plan_peak_heap_bytes_per_shard"] * 10 ** 6,
            "driver_heap_bytes_per_1e6_committed": round(out["driver"]["heap_bytes_per_committed_shard"] * 1e6)}


def targets(out: dict) -> dict:
    local = {r["shards"]: r for r in out["planning_local"]}
    moto = {r["shards"]: r for r in out["planning_moto"]}
    big_local, big_moto = local[max(local)], moto[max(moto)]
    measured = {"plan_1e5_names_local_s": big_local["names_3000_complete_s"],
                "plan_1e4_complete_moto_s": big_moto["seconds"],
                "requests_per_shard_moto": big_moto["requests_per_shard"],
                "plan_1e6_s3_extrapolated_s": out["extrapolated_1e6"]["plan_s3_all_complete_s"],
                "local_ms_per_complete_shard": big_local["ms_per_complete_shard"],
                "commits_per_s_moto": out["commits_moto"]["commits_per_s"]}
    return {k: {"measured": v, "target": TARGETS[k],
                "met": v >= TARGETS[k] if k == "commits_per_s_moto" else v <= TARGETS[k]} for k, v in measured.items()}


def plot(out: dict) -> None:
    fig, ax = axes(7, 4.5)
    local = out["planning_local"]
    ax.loglog([r["shards"] for r in local], [r["all_complete_s"] for r in local], "o-", label="plan, local, all done")
    ax.loglog([r["shards"] for r in local], [r["names_3000_complete_s"] for r in local], "s-",
              label="plan, local, 3,000 done")
    moto = out["planning_moto"]
    ax.loglog([r["shards"] for r in moto], [r["seconds"] for r in moto], "^-", label="plan, moto S3, all done")
    xs = [1e3, 1e6]
    ax.loglog(xs, [x * 1e-5 for x in xs], ":", color="grey", label="linear (10 µs/shard)")
    ax.set_xlabel("shards")
    save_plot(fig, ax, RESULTS / "scale_cpu.png", "Planning time vs folder size (CPU)", "seconds")


if __name__ == "__main__":
    main()
