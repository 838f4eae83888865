"""Latent shards into a DataLoader: samples/s and MB/s of latent bytes (local disk, CPU).

    python benchmarks/bench_reader.py --shards 4 --rows 256 --latent 16x9x32x32 --workers 0,2
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, write_json  # noqa: E402
from encoder_service.shards import LatentShardDataset, ShardWriter, encode_tensor  # noqa: E402
from encoder_service.storage import filesystem  # noqa: E402

RUN = {"vae_name": "bench", "vae_sha256": "0" * 64, "precision": "bf16", "pipeline_version": "bench"}


def make_shards(directory: str, shards: int, rows: int, shape: tuple[int, ...]) -> int:
    fs, path = filesystem(directory)
    writer, g = ShardWriter(fs, path, RUN), torch.Generator().manual_seed(0)
    for s in range(shards):
        records = []
        for i in range(rows):
            mean = torch.randn(shape, generator=g).bfloat16()
            records.append({"key": f"{s:06d}/{i:06d}/0", "source_url": "bench", "source_key": str(i), "clip_index": 0,
                            "frame_indices": list(range(33)), "src_fps": 30.0, "clip_fps": 30.0, "src_hw": [256, 256],
                            "crop_box": [0, 0, 256, 256], "bucket": "33x256x256", "metadata": "null",
                            "mean": encode_tensor(mean), "logvar": encode_tensor(mean), "latent_shape": list(shape),
                            "latent_dtype": "bfloat16", "scale": [1.0] * shape[0], "shift": [0.0] * shape[0], **RUN})
        writer.write(f"{s:06d}", records, [])
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
