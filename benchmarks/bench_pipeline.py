"""End-to-end job throughput and what the driver holds, for a dataset and the same dataset 4x over:
clips/s, how busy the encoder actors are (waiting for decoded input lowers it), the driver's peak
memory (resident set growth and Python heap) and the bytes it received per clip. Latents never
reach the driver, so its memory and traffic must stay flat as the dataset grows.

    python -m benchmarks.bench_pipeline                          # CPU: tiny bundled model, 64x64 clips
    python -m benchmarks.bench_pipeline --num-gpus 1 --checkpoint /models/WF-VAE-L-16Chn \\
        --size 512x512 --num-frames 33 --precision bf16 --videos 64 --video-size 540x960
    python -m benchmarks.bench_pipeline --num-gpus 1 --preset wfvae-l-16chn ...   # random weights, no download

Writes benchmarks/results/pipeline_<cpu|gpu>.json.
"""
import argparse
import json
import tempfile
import tracemalloc
from pathlib import Path

import ray
import torch
from safetensors.torch import save_file

from benchmarks.common import environment, write_json
from encoder_service.job.config import load_config
from encoder_service.job.demo import DEMO_CHECKPOINT
from encoder_service.job.run import run_job
from encoder_service.model import WFVAE, WFVAEConfig
from encoder_service.options import size
from encoder_service.samples import write_tar, write_video


def make_shards(root: Path, shards: int, videos: int, frames: int, hw: tuple[int, int]) -> str:
    video = write_video(root / "v.mp4", frames=frames, h=hw[0], w=hw[1]).read_bytes()
    for s in range(shards):
        write_tar(root / f"shard-{s:06d}.tar", [(f"v{v:04d}", {"mp4": video}) for v in range(videos)])
    return str(root / f"shard-{{000000..{shards - 1:06d}}}.tar")


def _hwm_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) << 10
    return 0


def random_checkpoint(config: WFVAEConfig, folder: Path) -> str:
    """A checkpoint (weights + config.json) of this architecture with random weights: throughput
    does not depend on the values, and the device machine cannot download the released ones."""
    torch.manual_seed(0)
    vae = WFVAE(config)
    (folder / "config.json").write_text(json.dumps(vae.config.to_dict()))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, folder / "weights.safetensors")
    return str(folder / "weights.safetensors")


def measured_run(args, shards: int, root: Path) -> dict:
    pattern = make_shards(root, shards, args.videos, args.video_frames, size(args.video_size))
    cfg = load_config(["--input", pattern, "--output", str(root / "out"), "--checkpoint", args.checkpoint,
                       "--num-frames", str(args.num_frames), "--size", args.size, "--clips-per-video", "all",
                       "--num-gpus", str(args.num_gpus), "--precision", args.precision, "--qa-fraction", "0",
                       "--batch-size", str(args.batch_size), "--metrics-linger-s", "0"])
    open("/proc/self/clear_refs", "w").write("5")  # reset the resident-set high-water mark
    rss_before = _hwm_bytes()
    tracemalloc.start()
    record = run_job(cfg)
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    keys = ("shards_done", "clips", "latents", "seconds", "clips_per_s", "encoder_busy_fraction")
    return {"shards": shards, **{k: record[k] for k in keys}, "driver_rss_growth_bytes": _hwm_bytes() - rss_before,
            "driver_python_heap_peak_bytes": heap_peak,
            "driver_bytes_received_per_clip": round(record["driver_bytes_received"] / max(1, record["clips"]), 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    p.add_argument("--preset", help="instead of --checkpoint: this released config with random weights")
    p.add_argument("--num-gpus", type=int, default=0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--size", default="64x64")
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--shards", type=int, default=3, help="the base dataset; the second run has 4x as many")
    p.add_argument("--videos", type=int, default=6, help="videos per shard")
    p.add_argument("--video-frames", type=int, default=52)
    p.add_argument("--video-size", default="144x176")
    p.add_argument("--smoke", action="store_true", help="one run, no warm-up (a check of the script)")
    args = p.parse_args(argv)
    weights = tempfile.TemporaryDirectory()
    if args.preset:
        args.checkpoint = random_checkpoint(WFVAEConfig.preset(args.preset), Path(weights.name))
    if not ray.is_initialized():  # before measuring: Ray's start is not the driver's
        ray.init(num_gpus=args.num_gpus or None, log_to_driver=False)
    if not args.smoke:
        with tempfile.TemporaryDirectory() as d:  # warm-up: the driver's first Ray Data run imports and caches
            measured_run(args, 1, Path(d))
    runs = []
    for factor in (1,) if args.smoke else (1, 4):
        with tempfile.TemporaryDirectory() as d:
            runs.append(measured_run(args, args.shards * factor, Path(d)))
            print(runs[-1], flush=True)
    device = "gpu" if args.num_gpus else "cpu"
    record = {"benchmark": "pipeline", "env": environment("cuda" if args.num_gpus else "cpu"), **vars(args),
              "runs": runs}
    if len(runs) == 2:
        record["ratios_4x_over_1x"] = {k: round(runs[1][k] / max(1e-9, runs[0][k]), 3) for k in
                                       ("clips_per_s", "driver_rss_growth_bytes", "driver_python_heap_peak_bytes",
                                        "driver_bytes_received_per_clip")}
        print(record["ratios_4x_over_1x"])
    print("wrote", write_json(f"pipeline_{device}", record))
    return record


if __name__ == "__main__":
    main()
