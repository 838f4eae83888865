"""Decode speed per CPU core: decord vs PyAV on H.264 at 480p, 720p and 1080p, with and without
resize to 256x256 (the ingest path: exact-index decode of a 33-frame clip, then resize + crop).

    python benchmarks/bench_decode.py [--frames 66] [--repeats 3]

A last case decodes a clip near the end of a long 720p video (keyframe every 48 frames), where
decord seeks to the nearest keyframe and a sequential decoder must decode everything before it.
The process is pinned to one core so the figure is frames/s per core. Writes
benchmarks/results/decode_cpu.json and a bar plot.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, axes, environment, save_plot, write_json  # noqa: E402
from encoder_service.ingest.decoders import get_decoder  # noqa: E402
from encoder_service.ingest.transforms import resize_and_crop  # noqa: E402
from encoder_service.samples import write_video  # noqa: E402

SIZES = {"480p": (480, 854), "720p": (720, 1280), "1080p": (1080, 1920)}
SEEK_CASE = ("720p-late-clip", (720, 1280), 600)  # a clip near the end of a 25 s video, keyframe every 2 s


def measure(decoder, path, indices, resize, repeats):
    times = []
    for _ in range(repeats + 1):  # first run is warm-up
        start = time.perf_counter()
        frames = decoder.frames(path, indices)
        if resize:
            resize_and_crop(frames, (256, 256))
        times.append(time.perf_counter() - start)
    return len(indices) / sorted(times[1:])[len(times[1:]) // 2]


def plot(rows, path):
    fig, ax = axes(7, 4)
    labels = [f"{r['resolution']}{' +resize' if r['resize'] else ''}".replace("-late-clip", "\nlate clip")
              for r in rows if r["decoder"] == "decord"]
    for i, name in enumerate(("decord", "pyav")):
        values = [r["frames_per_s_per_core"] for r in rows if r["decoder"] == name]
        ax.bar([x + i * 0.4 for x in range(len(values))], values, width=0.4, label=name)
    ax.set_xticks([x + 0.2 for x in range(len(labels))], labels)
    save_plot(fig, ax, path, "H.264 decode of a 33-frame clip (1 core)", "frames/s per core")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=66, help="length of the generated videos")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import torch
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, (h, w) in SIZES.items():
            path = write_video(Path(d) / f"{name}.mp4", frames=args.frames, h=h, w=w)
            indices = list(range(args.frames - 33, args.frames))  # a clip that is not at the start
            for resize in (False, True):
                for dec in ("decord", "pyav"):
                    fps = measure(get_decoder(dec), path, indices, resize, args.repeats)
                    rows.append({"decoder": dec, "resolution": name, "resize": resize, "frames_per_s_per_core": fps})
                    print(f"{name:>6} resize={resize!s:5} {dec:>6}: {fps:7.1f} frames/s per core")
    name, (h, w), n = SEEK_CASE
    with tempfile.TemporaryDirectory() as d:
        path = write_video(Path(d) / "long.mp4", frames=n, h=h, w=w, gop=48)
        for dec in ("decord", "pyav"):
            fps = measure(get_decoder(dec), path, list(range(n - 40, n - 7)), False, args.repeats)
            rows.append({"decoder": dec, "resolution": name, "resize": False, "frames_per_s_per_core": fps})
            print(f"{name}: {dec:>6}: {fps:7.1f} frames/s per core")
    write_json("decode_cpu", {"benchmark": "decode", "env": environment("cpu"), "clip_frames": 33,
                              "video_frames": args.frames, "codec": "h264 (libx264 crf 18, yuv420p)", "rows": rows})
    plot(rows, RESULTS / "decode_cpu.png")


if __name__ == "__main__":
    main()
