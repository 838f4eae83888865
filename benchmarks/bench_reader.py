"""The training reader against a plain pyarrow read of the same files, in the same run (CPU, local
disk): rows/s and MB/s of latent bytes, and the reader's peak RSS per worker against its
`prefetch_bytes`.

    reader   LatentShardDataset(shuffle=True, batch_size, prefetch_bytes) through a DataLoader with
             W workers, every batch's tensors made (decoded, stacked)
    pyarrow  the same files read with pyarrow.parquet in W processes (each a share of the files,
             all columns, page checksums on), turned into tensors per row group the cheapest way

    python -m benchmarks.bench_reader [--shards 24 --rows 64 --latent 16x9x32x32 --workers 4]

Writes benchmarks/results/reader_cpu.{json,png}.
"""
import argparse
import multiprocessing
import os
import resource
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from benchmarks.common import RESULTS, axes, environment, save_plot, write_json
from benchmarks.synthetic_folder import commit_rows, run_meta
from encoder_service.reader import LatentShardDataset
from encoder_service.reader.dataset import decode_column
from encoder_service.records import LatentRow
from encoder_service.table.schema import encode_tensor

RUN = run_meta("bench")


def make_folder(directory: str, shards: int, rows: int, shape: tuple[int, ...]) -> int:
    """An output folder as the job writes it (one data file per shard); returns latent bytes per row."""
    g = torch.Generator().manual_seed(0)
    bucket = "x".join(str(d) for d in shape[1:])
    for s in range(shards):
        batch = []
        for i in range(rows):
            mean = encode_tensor(torch.randn(shape, generator=g).bfloat16())
            batch.append(LatentRow(f"{s:06d}/{i:06d}/0", "bench", str(i), 0, list(range(33)), 30.0, 30.0,
                                   [256, 256], 0, [0, 0, 256, 256], bucket, "null", None, f"caption {i}", mean, mean,
                                   list(shape), "bfloat16", RUN.vae_name, RUN.vae_sha256, [1.0] * shape[0],
                                   [0.0] * shape[0], RUN.precision, RUN.pipeline_version))
        commit_rows(directory, {f"{s:06d}": batch}, run=RUN, row_group_bytes=1 << 20)
    return 2 * int(np.prod(shape)) * 2  # mean + logvar, bf16


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_reader(folder: str, workers: int, batch: int, prefetch: int) -> dict:
    ds = LatentShardDataset(folder, batch_size=batch, shuffle=True, seed=0, prefetch_bytes=prefetch)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False,
                        multiprocessing_context="fork" if workers else None)
    start, rows = time.perf_counter(), 0
    for b in loader:
        rows += b["latent"].shape[0]
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": round(seconds, 3)}


def _plain_share(args) -> int:
    files, dtype = args
    rows = 0
    for path in files:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        for g in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(g)
            shape = tuple(t["latent_shape"][0].as_py())
            for col in ("mean", "logvar"):  # the cheapest tensors: straight from the Arrow buffer
                decode_column(t[col], shape, dtype)
            rows += t.num_rows
    return rows


def run_plain(folder: str, workers: int) -> dict:
    """The same files (the table's file list) read by pyarrow in `workers` processes."""
    ds = LatentShardDataset(folder, shuffle=False)
    files = [f.uri for f in ds.files]
    shares = [(files[i::max(1, workers)], "bfloat16") for i in range(max(1, workers))]
    start = time.perf_counter()
    if workers:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            rows = sum(pool.map(_plain_share, shares))
    else:
        rows = _plain_share(shares[0])
    return {"rows": rows, "seconds": round(time.perf_counter() - start, 3)}


def _memory_child(folder: str, batch: int, prefetch: int) -> float:
    before = _rss_mb()
    for _ in LatentShardDataset(folder, batch_size=batch, shuffle=True, prefetch_bytes=prefetch):
        pass
    return _rss_mb() - before


def memory_bound(folder: str, batch: int, prefetch: int) -> dict:
    """Peak RSS growth of one reading process (no workers) for a given prefetch_bytes, in a fresh
    interpreter (delta-rs' runtime does not survive a fork)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        grown = pool.apply(_memory_child, (folder, batch, prefetch))
    return {"prefetch_mb": prefetch / 2 ** 20, "rss_growth_mb": round(grown, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=24)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--latent", default="16x9x32x32")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prefetch-mb", default="16,64,256")
    p.add_argument("--no-write", action="store_true", help="print only (a smoke run)")
    args = p.parse_args()
    shape = tuple(int(v) for v in args.latent.split("x"))
    with tempfile.TemporaryDirectory() as d:
        row_bytes = make_folder(d, args.shards, args.rows, shape)
        results = {}
        for name, fn in (("pyarrow", lambda: run_plain(d, args.workers)),
                         ("reader", lambda: run_reader(d, args.workers, args.batch_size, 256 << 20))):
            fn()  # warm the page cache
            runs = [fn() for _ in range(3)]
            best = min(runs, key=lambda r: r["seconds"])
            results[name] = {**best, "rows_per_s": round(best["rows"] / best["seconds"], 1),
                             "mb_per_s": round(best["rows"] * row_bytes / best["seconds"] / 1e6, 1),
                             "seconds_all": [r["seconds"] for r in runs]}
            print(f"{name:8s} {args.workers} workers: {results[name]['rows_per_s']:.0f} rows/s, "
                  f"{results[name]['mb_per_s']:.1f} MB/s of latents", flush=True)
        ratio = round(results["reader"]["rows_per_s"] / results["pyarrow"]["rows_per_s"], 3)
        memory = [memory_bound(d, args.batch_size, int(float(mb) * 2 ** 20)) for mb in args.prefetch_mb.split(",")]
        for m in memory:
            print(f"prefetch {m['prefetch_mb']:.0f} MiB: peak RSS growth {m['rss_growth_mb']} MB", flush=True)
    print(f"reader / pyarrow: {ratio}x (target >= 0.8)")
    out = {"benchmark": "latent_reader", "env": environment("cpu"), "latent_shape": shape, "dtype": "bfloat16",
           "shards": args.shards, "rows_per_shard": args.rows, "batch_size": args.batch_size,
           "workers": args.workers, "shuffle": True, "results": results, "reader_over_pyarrow": ratio,
           "memory": memory, "cpus": os.cpu_count(), "note": "CPU figures, local disk, page cache warm"}
    if not args.no_write:
        write_json("reader_cpu", out)
        fig, ax = axes(6, 4)
        ax.bar(["pyarrow", "reader"], [results["pyarrow"]["mb_per_s"], results["reader"]["mb_per_s"]])
        save_plot(fig, ax, RESULTS / "reader_cpu.png", f"Reader vs pyarrow, {args.workers} workers (CPU)",
                  "MB/s of latents")


if __name__ == "__main__":
    main()
