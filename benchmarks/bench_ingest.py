"""Ingest speed per CPU core beside ffmpeg, in the same run.

The project's ingest path (a one-sample WebDataset shard through encoder_service.ingest: tar
streaming, probe, one decode pass with in-decoder scaling, crop into the clip buffer), pinned to
one core, against

    ffmpeg -threads 1 -i IN -vf scale=-2:S,crop=S:S -f rawvideo -pix_fmt rgb24 -   (also one core)

(-frames:v 33 for the first-clip case). Figures are frames delivered per second; the ratio is
ours / ffmpeg with ffmpeg's process start-up taken out (the stricter comparison; ours includes
reading the tar and probing). Sources: 300-frame H.264 videos at 480p, 720p and 1080p with a short (12) and a
long (250) GOP; 33-frame clips, first clip or all non-overlapping clips, 256^2 and 512^2; and 480^2 from
480p, 720^2 from 720p (no scaling: swscale's exact YUV->RGB path, ingest/decoders.py SWS_FLAGS).

    python -m benchmarks.bench_ingest                    # the full matrix (a few minutes)
    python -m benchmarks.bench_ingest --quick            # one small case (the test suite's smoke run)

Writes benchmarks/results/ingest_cpu.json and .png. These are CPU figures of this machine.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, axes, environment, save_plot, write_json
from encoder_service.ingest.clips import IngestConfig, IngestedClip, ingest_shard
from encoder_service.ingest.sampling import SamplingConfig
from encoder_service.samples import write_tar

RESOLUTIONS = {"480p": (480, 854), "720p": (720, 1280), "1080p": (1080, 1920)}
GOPS = (12, 250)
FRAMES = 300


def source(root: Path, name: str, hw, gop: int, frames: int) -> Path:
    path = root / f"{name}_gop{gop}.mp4"
    if not path.exists():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={hw[1]}x{hw[0]}:rate=30",
                        "-frames:v", str(frames), "-c:v", "libx264", "-preset", "fast", "-g", str(gop),
                        "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def _ffmpeg(path: Path, size: int, frames: int | None) -> tuple[float, int]:
    cmd = ["ffmpeg", "-v", "error", "-threads", "1", "-i", str(path), *(["-frames:v", str(frames)] if frames else []),
           "-vf", f"scale=-2:{size},crop={size}:{size}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, preexec_fn=lambda: os.sched_setaffinity(0, {0})).stdout
    return time.perf_counter() - start, len(out) // (size * size * 3)


def ffmpeg_fps(path: Path, size: int, frames: int | None, repeats: int) -> tuple[float, float]:
    """(frames/s of the reference command, the same with ffmpeg's start-up -- a 1-frame run --
    taken out: the stricter reference, which the ratio uses)."""
    runs = [_ffmpeg(path, size, frames) for _ in range(repeats)]
    startup = statistics.median(_ffmpeg(path, size, 1)[0] for _ in range(repeats))
    seconds, delivered = statistics.median(t for t, _ in runs), runs[0][1]
    return delivered / seconds, delivered / max(1e-9, seconds - startup)


def ours_fps(shard: Path, size: int, mode: str, decoder: str, repeats: int) -> float:
    cfg = IngestConfig(SamplingConfig(num_frames=33, size=(size, size), clips=mode), decoder)
    times, delivered = [], 0
    for _ in range(1 + repeats):  # the first run warms up (glibc's mmap threshold, caches): not timed
        start = time.perf_counter()
        items = list(ingest_shard(str(shard), cfg))
        times.append(time.perf_counter() - start)
        clips = [i for i in items if isinstance(i, IngestedClip)]
        assert clips and len(clips) == len(items), [i for i in items if not isinstance(i, IngestedClip)]
        delivered = sum(c.frames.shape[0] for c in clips)
    return delivered / statistics.median(times[1:])


def cases(quick: bool):
    if quick:
        yield "480p", 12, 256, "first"
        return
    for res in RESOLUTIONS:
        for gop in GOPS:
            for size in (256, 512):
                for mode in ("first", "all"):
                    yield res, gop, size, mode
    for res in ("480p", "720p"):  # clip size = the source's height: frames kept at their stored size
        yield res, 12, RESOLUTIONS[res][0], "all"


def run(args) -> dict:
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})  # one core, as the ffmpeg reference
    try:
        return _run(args)
    finally:
        os.sched_setaffinity(0, cores)  # (a caller such as the test suite gets its cores back)


def _run(args) -> dict:
    root = Path(args.cache or tempfile.mkdtemp(prefix="wfvae-bench-ingest-"))
    root.mkdir(parents=True, exist_ok=True)
    frames = 40 if args.quick else FRAMES
    records = []
    for res, gop, size, mode in cases(args.quick):
        video = source(root, res, RESOLUTIONS[res], gop, frames)
        shard = write_tar(root / f"{video.stem}.tar", [("v", {"mp4": video.read_bytes()})])
        whole, reference = ffmpeg_fps(video, size, 33 if mode == "first" else None, args.repeats)
        for decoder in args.decoders:
            fps = ours_fps(shard, size, mode, decoder, args.repeats)
            records.append({"source": res, "gop": gop, "frames": frames, "size": size, "clips": mode,
                            "decoder": decoder, "ours_fps": round(fps, 1), "ffmpeg_fps": round(whole, 1),
                            "ffmpeg_fps_without_startup": round(reference, 1), "ratio": round(fps / reference, 3)})
            print(json.dumps(records[-1]), flush=True)
    if not args.cache:
        shutil.rmtree(root, ignore_errors=True)
    ffmpeg = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.splitlines()[0]
    return {"benchmark": "ingest", "env": {**environment("cpu"), "cores": 1, "ffmpeg": ffmpeg}, "records": records}


def plot(payload: dict, path: Path) -> None:
    fig, ax = axes(11, 4)
    records = payload["records"]
    labels = sorted({f"{r['source']} g{r['gop']} {r['size']}² {r['clips']}" for r in records},
                    key=lambda s: (s.split()[0], s))
    for k, decoder in enumerate(sorted({r["decoder"] for r in records})):
        ratio = {f"{r['source']} g{r['gop']} {r['size']}² {r['clips']}": r["ratio"]
                 for r in records if r["decoder"] == decoder}
        ax.bar([i + 0.4 * k for i in range(len(labels))], [ratio.get(label, 0) for label in labels], 0.4, label=decoder)
    ax.axhline(0.8, color="k", linestyle="--", linewidth=1, label="target 0.8x")
    ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, rotation=60, ha="right", fontsize=7)
    save_plot(fig, ax, path, "Ingest frames/s per core, ours / ffmpeg -threads 1 (CPU)", "ratio")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small case")
    p.add_argument("--decoders", nargs="+", default=["pyav", "decord"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", help="keep generated sources in this folder")
    p.add_argument("--out", help="JSON path (default benchmarks/results/ingest_cpu.json)")
    args = p.parse_args(argv)
    payload = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2))
        plot(payload, Path(args.out).with_suffix(".png"))
    else:
        path = write_json("ingest_cpu", payload)
        plot(payload, RESULTS / "ingest_cpu.png")
        print("wrote", path)
    return payload


if __name__ == "__main__":
    main()
