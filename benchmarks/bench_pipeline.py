"""End-to-end job throughput: clips/s and how busy the encoder actors are (waiting for decoded
input lowers it). Generates shards of H.264 videos, runs the real job on a local Ray cluster.

    python benchmarks/bench_pipeline.py                          # CPU: tiny bundled model, 64x64 clips
    python benchmarks/bench_pipeline.py --num-gpus 1 --checkpoint /models/WF-VAE-L-16Chn \
        --size 512x512 --num-frames 33 --precision bf16 --videos 64 --video-size 540x960

Writes benchmarks/results/pipeline_<cpu|gpu>.json.
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, write_json  # noqa: E402
from encoder_service.job.config import load_config  # noqa: E402
from encoder_service.job.demo import DEMO_CHECKPOINT  # noqa: E402
from encoder_service.job.run import run_job  # noqa: E402
from encoder_service.samples import write_tar, write_video  # noqa: E402


def make_shards(root: Path, shards: int, videos: int, frames: int, hw: tuple[int, int]) -> str:
    for s in range(shards):
        samples = [(f"v{v:04d}", {"mp4": write_video(root / f"{s}_{v}.mp4", frames=frames, h=hw[0], w=hw[1]).read_bytes()})
                   for v in range(videos)]
        write_tar(root / f"shard-{s:06d}.tar", samples)
    return str(root / f"shard-{{000000..{shards - 1:06d}}}.tar")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    p.add_argument("--num-gpus", type=int, default=0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--size", default="64x64")
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--videos", type=int, default=6, help="videos per shard")
    p.add_argument("--video-frames", type=int, default=40)
    p.add_argument("--video-size", default="144x176")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        pattern = make_shards(Path(d), args.shards, args.videos, args.video_frames,
                              tuple(int(v) for v in args.video_size.split("x")))
        cfg, _ = load_config(["--input", pattern, "--output", str(Path(d) / "out"), "--checkpoint", args.checkpoint,
                              "--num-frames", str(args.num_frames), "--size", args.size, "--clips-per-video", "all",
                              "--num-gpus", str(args.num_gpus), "--precision", args.precision,
                              "--batch-size", str(args.batch_size), "--metrics-linger-s", "0"])
        summary = run_job(cfg)
    device = "gpu" if args.num_gpus else "cpu"
    keys = ("shards_done", "clips", "latents", "errors", "seconds", "clips_per_s", "encoder_busy_fraction")
    record = {"benchmark": "pipeline", "env": environment("cuda" if args.num_gpus else "cpu"), **vars(args),
              **{k: summary[k] for k in keys}}
    print({k: summary[k] for k in keys})
    print("wrote", write_json(f"pipeline_{device}", record))


if __name__ == "__main__":
    main()
