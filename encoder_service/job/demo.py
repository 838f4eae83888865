"""`--demo`: sample WebDataset shards of generated videos and the bundled tiny checkpoint, so the job
runs end to end on a fresh clone with no data and no GPU."""
import json
from pathlib import Path

from encoder_service.samples import write_tar, write_video

REPO = Path(__file__).resolve().parents[2]
DEMO_CHECKPOINT = REPO / "tests" / "data" / "golden-small" / "weights.safetensors"  # tiny random-weight WF-VAE


def make_demo_shards(root: Path, shards: int = 2, videos_per_shard: int = 4) -> str:
    root.mkdir(parents=True, exist_ok=True)
    media = root / "media"
    media.mkdir(exist_ok=True)
    for s in range(shards):
        target = root / f"shard-{s:06d}.tar"
        if target.exists():
            continue
        samples = []
        for v in range(videos_per_shard):
            video = write_video(media / f"{s}_{v}.mp4", frames=24 + 4 * v, h=72 + 8 * v, w=96)
            samples.append((f"clip{v:03d}", {"mp4": video.read_bytes(),
                                             "json": json.dumps({"caption": f"demo video {s}/{v}"}).encode()}))
        samples.append(("broken", {"mp4": b"not a video"}))  # lands in the error ledger
        write_tar(target, samples)
    return str(root / f"shard-{{000000..{shards - 1:06d}}}.tar")


def demo_arguments(output_root: Path) -> list[str]:
    pattern = make_demo_shards(output_root / "input")
    return ["--input", pattern, "--output", str(output_root / "output"), "--checkpoint", str(DEMO_CHECKPOINT),
            "--num-frames", "17", "--size", "64x64", "--clips-per-video", "all", "--num-gpus", "0",
            "--precision", "fp32", "--batch-size", "2", "--qa-fraction", "0.5", "--progress-every-s", "5",
            "--metrics-linger-s", "0"]
