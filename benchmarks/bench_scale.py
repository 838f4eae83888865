"""The output folder (a Delta table) at the size users run: planning, `inspect`, opening the reader,
and the driver's group commits.

    planning   wall seconds and peak RSS of planning a folder of N complete shards (N input names),
               locally N = 10^4, 10^5, 10^6, each in a fresh process; on a moto S3 server over HTTP
               N = 10^4, 10^5 with the requests counted from the server's log (the input listing,
               one request per 1,000 names, counted apart)
    inspect    the same folders: seconds locally, requests on moto (a rare ledger reason present)
    reader     LatentShardDataset opening the same folders: seconds locally, requests on moto
    commits    shards per second committed by a real Driver on moto (group commits), one 4 KiB
               data file per shard

Folders are made through the project's own writer and commits (benchmarks/synthetic_folder.py:
shard records and log entries; the data files are never read by what is measured here). CPU
figures of this machine; moto is a Python server, slower per request than S3.

    python -m benchmarks.bench_scale [--quick]

Writes benchmarks/results/scale_cpu.{json,png}.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import synthetic_folder
from benchmarks.common import RESULTS, axes, environment, save_plot, write_json
from encoder_service.job.config import fingerprint, load_config
from encoder_service.job.plan import model_identity, prepare
from encoder_service.storage import StorageOptions, filesystem

CKPT = str(Path(__file__).resolve().parents[1] / "tests" / "data" / "golden-small" / "weights.safetensors")
TARGETS = {"plan_1e6_local_s": 15.0, "plan_1e6_local_peak_rss_mb": 1024.0, "plan_1e5_moto_requests": 30,
           "reader_open_1e5_local_s": 5.0, "reader_open_1e5_moto_requests": 20, "inspect_1e5_local_s": 5.0,
           "inspect_1e5_moto_requests": 20, "commits_per_s_moto": 100.0}


def job_config(inputs: str, output: str, endpoint: str | None = None):
    return load_config(["--input", inputs, "--output", output, "--checkpoint", CKPT, "--num-gpus", "0",
                        "--progress-every-s", "1000", "--metrics-linger-s", "0",
                        *(["--s3-endpoint-url", endpoint] if endpoint else [])])


def make_folder(base: str, n: int, storage=None, endpoint=None) -> tuple:
    """(config, input URLs) for a folder whose n input shards are all committed."""
    urls = synthetic_folder.input_urls(f"{base}/in", n)
    synthetic_folder.write_inputs(urls, storage)
    cfg = job_config(f"{base}/in/shard-{{0000000..{n - 1:07d}}}.tar", f"{base}/out", endpoint)
    model, digest, _ = model_identity(cfg)
    settings = cfg.latent_settings(digest, model.to_dict())
    fp = fingerprint(settings)
    synthetic_folder.table_folder(f"{base}/out", fp, storage, settings)
    start = time.perf_counter()
    synthetic_folder.commit_synthetic(f"{base}/out", urls, fp, synthetic_folder.run_meta(fp), storage)
    print(f"  made {n} committed shards in {time.perf_counter() - start:.1f} s", flush=True)
    return cfg, urls


# ---- what is measured, each in a fresh process (child mode) ---------------------------------------
def child(what: str, inputs: str, output: str, endpoint: str | None) -> dict:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if what == "plan":
        plan = prepare(job_config(inputs, output, endpoint))
        plan.lease.release()
        extra = {"todo": len(plan.todo), "complete": plan.skipped}
    elif what == "inspect":
        from encoder_service.inspect import inspect_folder
        report = inspect_folder(output, storage=StorageOptions(endpoint_url=endpoint))
        extra = {"shards": len(report["shards_done"]), "reasons": sorted(report["ledger"])}
    else:
        from encoder_service.reader import LatentShardDataset
        ds = LatentShardDataset(output, storage=StorageOptions(endpoint_url=endpoint), batch_size=8)
        extra = {"files": len(ds.files)}
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(rss / 1024, 1),
            "rss_growth_mb": round((rss - base) / 1024, 1), **extra}


def measure(what: str, cfg, requests=None) -> dict:
    """Run one measurement in a fresh interpreter (imports paid before the clock starts)."""
    endpoint = cfg.s3_endpoint_url
    before = requests() if requests else 0
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "--child", what, cfg.input[0],
                             cfg.output, endpoint or ""], capture_output=True, text=True, timeout=3600,
                            env={**os.environ, "RAY_ADDRESS": ""})
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    out = json.loads(result.stdout.strip().splitlines()[-1])
    if requests:
        out["requests"] = requests() - before
    return out


def bench_local(sizes) -> list[dict]:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            cfg, _ = make_folder(d, n)
            row = {"shards": n, **{k: measure(k, cfg) for k in ("plan", "inspect", "reader")}}
        rows.append(row)
        print(f"local   N={n:>8}: plan {row['plan']['seconds']:.2f} s (peak RSS {row['plan']['peak_rss_mb']:.0f} MB), "
              f"inspect {row['inspect']['seconds']:.2f} s, reader open {row['reader']['seconds']:.2f} s", flush=True)
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
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.unlink(self.log)


def bench_moto(moto: Moto, sizes) -> list[dict]:
    rows = []
    for n in sizes:
        cfg, _ = make_folder(moto.bucket(f"scale-{n}"), n, moto.storage, moto.endpoint)
        row = {"shards": n, **{k: measure(k, cfg, moto.requests) for k in ("plan", "inspect", "reader")}}
        row["plan"]["input_listing_requests"] = -(-n // 1000)
        row["plan"]["requests_without_input_listing"] = row["plan"]["requests"] - row["plan"]["input_listing_requests"]
        rows.append(row)
        print(f"moto    N={n:>8}: plan {row['plan']['seconds']:.2f} s, {row['plan']['requests']} requests "
              f"({row['plan']['requests_without_input_listing']} without the input listing); inspect "
              f"{row['inspect']['requests']} requests; reader open {row['reader']['requests']} requests", flush=True)
    return rows


def bench_moto_commits(moto: Moto, n: int) -> dict:
    """A real Driver committing n one-file shards on moto (the files put first, as actors would)."""
    from encoder_service.job.driver import Driver
    from encoder_service.records import DataFile, ShardEnd, StageRow, UnitResult
    from encoder_service.table import layout
    bucket = moto.bucket(f"commits-{n}")
    urls = synthetic_folder.input_urls(f"{bucket}/in", n)
    synthetic_folder.write_inputs(urls, moto.storage)
    cfg = job_config(f"{bucket}/in/shard-{{0000000..{n - 1:07d}}}.tar", f"{bucket}/out", moto.endpoint)
    plan = prepare(cfg)
    payload = b"x" * 4096
    rows = []
    for url, sid in plan.todo:
        name = layout.data_name(sid, 0, "0" * 16)
        plan.folder.fs.pipe_file(plan.folder.path(name), payload)
        file = DataFile(name, 4, len(payload), "0" * 64, f"{sid}/a/0", f"{sid}/z/0", "33x256x256")
        rows += [StageRow("result", sid, result=UnitResult(sid, 0, 4, file, [], 0.1)),
                 StageRow("end", sid, end=ShardEnd(sid, url, 1, 4, []))]
    before = moto.requests()
    driver = Driver(plan, group_shards=cfg.commit_group_shards, group_s=cfg.commit_group_s)
    start = time.perf_counter()
    for row in rows:
        driver.add(row)
    driver.close()
    seconds = time.perf_counter() - start
    requests = moto.requests() - before
    plan.lease.release()
    out = {"shards": n, "group_shards": cfg.commit_group_shards, "committed": driver.totals.committed.shards,
           "failed": len(driver.totals.failed), "seconds": round(seconds, 2),
           "shards_per_s": round(driver.totals.committed.shards / seconds, 1), "requests": requests,
           "requests_per_shard": round(requests / n, 3)}
    print(f"commits on moto: {out['shards_per_s']} shards/s ({n} shards, groups of {cfg.commit_group_shards}, "
          f"{requests} requests)", flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not the figures)")
    p.add_argument("--parts", default="local,moto,commits", help="which parts to run (the others are kept from "
                   "results/scale_cpu.json): local, moto, commits")
    p.add_argument("--child", nargs=4, metavar=("WHAT", "INPUTS", "OUTPUT", "ENDPOINT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        what, inputs, output, endpoint = args.child
        print(json.dumps(child(what, inputs, output, endpoint or None)))
        return
    local_sizes, moto_sizes, commit_n = (([10_000, 100_000, 1_000_000], [10_000, 100_000], 2000)
                                         if not args.quick else ([300], [300], 100))
    parts = set(args.parts.split(","))
    path = RESULTS / "scale_cpu.json"
    kept = json.loads(path.read_text()) if path.exists() and not args.quick else {}
    out = {k: kept[k] for k in ("local", "moto", "commits_moto") if k in kept}  # parts not run this time
    out.update({"environment": environment("cpu"), "note": "CPU figures; moto is a local Python S3 server"})

    def save():  # after each part: a long run that fails late keeps what it measured
        if not args.quick:
            write_json("scale_cpu", out)
    if "local" in parts:
        out["local"] = bench_local(local_sizes)
        save()
    with Moto() as moto:
        if "moto" in parts:
            out["moto"] = bench_moto(moto, moto_sizes)
            save()
        if "commits" in parts:
            out["commits_moto"] = bench_moto_commits(moto, commit_n)
    out["targets"] = targets(out)
    if not args.quick:
        save()
        plot(out)
    for name, t in out["targets"].items():
        print(f"target {name}: {t['measured']} (target {t['target']}) {'met' if t['met'] else 'MISSED'}")


def targets(out: dict) -> dict:
    """Each target beside its measured value, for the parts measured so far."""
    measured = {}
    if out.get("local"):
        local = {r["shards"]: r for r in out["local"]}
        big, mid = local[max(local)], local.get(100_000, local[max(local)])
        measured.update({"plan_1e6_local_s": big["plan"]["seconds"],
                         "plan_1e6_local_peak_rss_mb": big["plan"]["peak_rss_mb"],
                         "reader_open_1e5_local_s": mid["reader"]["seconds"],
                         "inspect_1e5_local_s": mid["inspect"]["seconds"]})
    if out.get("moto"):
        m = max(out["moto"], key=lambda r: r["shards"])
        measured.update({"plan_1e5_moto_requests": m["plan"]["requests_without_input_listing"],
                         "reader_open_1e5_moto_requests": m["reader"]["requests"],
                         "inspect_1e5_moto_requests": m["inspect"]["requests"]})
    if out.get("commits_moto"):
        measured["commits_per_s_moto"] = out["commits_moto"]["shards_per_s"]
    return {k: {"measured": v, "target": TARGETS[k],
                "met": v >= TARGETS[k] if k == "commits_per_s_moto" else v <= TARGETS[k]} for k, v in measured.items()}


def plot(out: dict) -> None:
    if not out.get("local") or not out.get("moto"):
        return
    fig, ax = axes(7, 4.5)
    local = out["local"]
    xs = [r["shards"] for r in local]
    for what, mark in (("plan", "o-"), ("inspect", "s-"), ("reader", "^-")):
        ax.loglog(xs, [r[what]["seconds"] for r in local], mark, label=f"{what}, local")
    moto = out["moto"]
    ax.loglog([r["shards"] for r in moto], [r["plan"]["seconds"] for r in moto], "o--", label="plan, moto S3")
    ax.loglog([1e4, 1e6], [1e-1, 10], ":", color="grey", label="linear (10 µs/shard)")
    ax.set_xlabel("committed shards")
    save_plot(fig, ax, RESULTS / "scale_cpu.png", "Delta-table folder: planning, inspect, reader open (CPU)",
              "seconds")


if __name__ == "__main__":
    main()
