"""Latent shards into a DataLoader: samples/s and MB/s of latent bytes (local disk, CPU).

    python -m benchmarks.bench_reader --shards 4 --rows 256 --latent 16x9x32x32 --workers 0,2
"""
import argparse
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from benchmarks.common import environment, write_json
from encoder_service.records import DataFile, LatentRow, Manifest, RunMeta, ShardStats
from encoder_service.table import SCHEMA_VERSION, LatentShardDataset, StagingWriter, commit_shard, encode_tensor
from encoder_service.storage import filesystem

RUN = RunMeta("bench", "0" * 64, "bf16", "bench", [1.0] * 16, [0.0] * 16, "bench")


def make_shards(directory: str, shards: int, rows: int, shape: tuple[int, ...]) -> int:
    """Output-folder shards as the job writes them (one data file each)."""
    fs, root = filesystem(directory)
    writer, g = StagingWriter(fs, root, RUN), torch.Generator().manual_seed(0)
    for s in range(shards):
        records = []
        for i in range(rows):
            mean = encode_tensor(torch.randn(shape, generator=g).bfloat16())
            records.append(LatentRow(f"{s:06d}/{i:06d}/0", "bench", str(i), 0, list(range(33)), 30.0, 30.0,
                                     [256, 256], 0, [0, 0, 256, 256], "33x256x256", "null", None, None, mean, mean,
                                     list(shape), "bfloat16", RUN.vae_name, RUN.vae_sha256, [1.0] * shape[0],
                                     [0.0] * shape[0], RUN.precision, RUN.pipeline_version))
        manifest = Manifest(SCHEMA_VERSION, f"{s:06d}", "bench", RUN, "bench", None, rows, rows, {}, 0, ShardStats(),
                            [], [], DataFile("", 0, 0, ""))
        commit_shard(fs, root, manifest, {0: writer.write(f"{s:06d}", 0, records)}, [])
    return 2 * torch.Size(shape).numel() * 2  # mean + logvar, bf16


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--latent", default="16x9x32x32")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    shape = tuple(int(v) for v in args.latent.split("x"))
    results = []
    with tempfile.TemporaryDirectory() as d:
        row_bytes = make_shards(d, args.shards, args.rows, shape)
        for workers in (int(w) for w in args.workers.split(",")):
            ds = LatentShardDataset(d, batch_size=args.batch_size)
            loader = DataLoader(ds, batch_size=None, num_workers=workers)
            start, n = time.perf_counter(), 0
            for batch in loader:
                n += len(batch["key"])
            seconds = time.perf_counter() - start
            row = {"workers": workers, "samples": n, "seconds": seconds, "samples_per_s": n / seconds,
                   "mb_per_s": n * row_bytes / seconds / 1e6}
            results.append(row)
            print(f"workers={workers}: {row['samples_per_s']:.0f} samples/s, {row['mb_per_s']:.1f} MB/s of latents")
    out = write_json("reader_cpu", {"benchmark": "latent_reader", "env": environment("cpu"), "latent_shape": shape,
                                    "dtype": "bfloat16", "shards": args.shards, "rows_per_shard": args.rows,
                                    "batch_size": args.batch_size, "results": results})
    print("wrote", out)


if __name__ == "__main__":
    main()
