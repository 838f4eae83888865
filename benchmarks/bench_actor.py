"""The encoder actor's loop over real units: how much host work stays on the device's critical path.

Each case builds one real unit row (the Arrow table ingest hands the actor: `--file-mb` 32 of
WF-VAE-L latents, i.e. 56 clips at 33x256², 14 at 33x512²) and runs `--units` of them through the
actor's own code (stages.unit_and_frames, then job/unit_encoder.UnitEncoder: device copy, model,
latents to rows, statistics, zstd Parquet, sha256, staging file):

    serial      one unit at a time, as the actor's loop was: host work between model calls
    pipelined   UNITS_IN_FLIGHT calls at once, as Ray runs them in the actor now

On the CPU the model is replaced by a stand-in that takes a fixed, stated time per clip (it
sleeps, as a CPU thread waiting on a GPU does) and returns latents of WF-VAE-L's shape; what is
measured is the actor's own code around it. Model time per clip: 25 and 50 ms at 33x512²
(the issue's assumptions for an H100), the same per pixel at 256² (6.25 and 12.5 ms).
host ms per clip on the critical path = (time from the first model call's start to the last one's
end - model time) / clips: what the device waits for between model calls in steady state (filling
and draining the pipeline, once per run, is reported apart). With --device cuda the real model
runs (--preset, random weights).

Also: PSNR+SSIM of one QA clip, the float64 formula of before against encoder_service.quality.

    python -m benchmarks.bench_actor                # CPU, writes results/actor_cpu.{json,png}
    python -m benchmarks.bench_actor --device cuda  # WF-VAE-L bf16 on the GPU: actor_cuda.json
"""
import argparse
import tempfile
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, axes, environment, save_plot, write_json
from encoder_service.engine import Encoded, LatentEncoder, channel_sums
from encoder_service.job.stages import unit_and_frames
from encoder_service.job.unit_encoder import UNITS_IN_FLIGHT, UnitEncoder
from encoder_service.job.units import UnitBuilder, UnitPlan
from encoder_service.model import WFVAE, WFVAEConfig
from encoder_service.quality import psnr, ssim
from encoder_service.records import Clip, RunMeta, StageRow, to_table
from encoder_service.storage import filesystem
from encoder_service.table.writer import UnitWriter

LATENT_DIM = 16  # WF-VAE-L
MS_PER_CLIP_512 = (25.0, 50.0)


class FixedTimeModel:
    """Stands in for LatentEncoder on the CPU: the same three calls, the model taking a fixed
    time per clip (a sleep: the thread waits, as for a GPU) and giving WF-VAE-L-shaped latents."""

    def __init__(self, seconds_per_clip: float, shape):
        t, h, w = shape[0], shape[1], shape[2]
        self.seconds_per_clip, self.device = seconds_per_clip, torch.device("cpu")
        self.latent = torch.randn(64, LATENT_DIM, (t - 1) // 4 + 1, h // 8, w // 8).to(torch.bfloat16)

    def to_device(self, frames: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(frames).permute(0, 4, 1, 2, 3)

    def forward(self, x: torch.Tensor) -> Encoded:
        b = x.shape[0]
        time.sleep(self.seconds_per_clip * b)
        mean = logvar = self.latent[:b]
        sums = torch.stack([channel_sums(mean), channel_sums(logvar)], dim=1)
        return Encoded(mean, logvar, torch.ones(b, dtype=torch.bool), sums)


def unit_table(shape, clips_per_unit: int) -> "object":
    """One real unit row, as ingest makes it."""
    rng = np.random.default_rng(0)
    plan = UnitPlan(LATENT_DIM, 2, 2, 32 << 20)
    builder = UnitBuilder("shard-000000", plan)
    rows = []
    frames = rng.integers(0, 256, (clips_per_unit, *shape, 3), dtype=np.uint8)
    for i in range(clips_per_unit):
        clip = Clip(f"shard-000000/v{i:03d}/0", "s3://in/shard-000000.tar", f"v{i:03d}", 0, list(range(shape[0])),
                    30.0, 30.0, [720, 1280], 0, [0, 0, shape[1], shape[2]], f"{shape[0]}x{shape[1]}x{shape[2]}", "{}",
                    None, None)
        rows += list(builder.add(clip, frames[i]))
    rows += list(builder.flush())
    assert len(rows) == 1, f"{len(rows)} units: the unit plan split the clips"
    return to_table(rows, StageRow)


def clips_per_unit(shape) -> int:
    return UnitPlan(LATENT_DIM, 2, 2, 32 << 20).clips_per_unit((*shape, 3))


def run(encoder, table, units: int, in_flight: int, batch_size: int, folder: str) -> dict:
    """`units` calls of the actor's code, `in_flight` at a time; wall and model seconds."""
    fs, root = filesystem(folder)
    meta = RunMeta("wfvae-l-16chn", "0" * 64, "bf16", "bench", [1.0] * LATENT_DIM, [0.0] * LATENT_DIM, "bench")
    coder = UnitEncoder(encoder, UnitWriter(fs, root, meta), meta, batch_size, True)
    model, critical, lock, todo = [0.0], [0.0], threading.Lock(), list(range(units))
    span = [float("inf"), 0.0]

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            unit, frames = unit_and_frames(table, 0)
            out = coder.encode(unit, frames)
            with lock:
                model[0] += out.timing.model
                critical[0] += out.timing.critical
                span[0], span[1] = min(span[0], out.timing.first_model), max(span[1], out.timing.last_model)
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "model_s": model[0], "critical_s": critical[0], "span_s": span[1] - span[0]}


def case(shape, args, folder: str) -> dict:
    n = clips_per_unit(shape)
    table = unit_table(shape, n)
    clips = n * args.units
    out = {"size": "x".join(map(str, shape)), "clips_per_unit": n, "units": args.units}
    scale = shape[1] * shape[2] / (512 * 512)
    for ms in MS_PER_CLIP_512:
        encoder = real_encoder(args) if args.device == "cuda" else FixedTimeModel(ms * scale / 1000, shape)
        serial = run(encoder, table, args.units, 1, args.batch_size, folder)
        piped = run(encoder, table, args.units, UNITS_IN_FLIGHT, args.batch_size, folder)
        tag = "real_model" if args.device == "cuda" else f"{ms:g}ms"
        out[f"model_ms_per_clip_{tag}"] = round(1000 * piped["model_s"] / clips, 3)
        out[f"busy_fraction_serial_at_{tag}"] = round(serial["model_s"] / serial["span_s"], 4)
        out[f"busy_fraction_at_{tag}"] = round(piped["model_s"] / piped["span_s"], 4)
        out[f"host_ms_per_clip_serial_at_{tag}"] = round(1000 * (serial["span_s"] - serial["model_s"]) / clips, 3)
        out[f"host_ms_per_clip_critical_path_at_{tag}"] = round(1000 * (piped["span_s"] - piped["model_s"]) / clips, 3)
        out[f"fill_and_drain_s_at_{tag}"] = round(piped["wall_s"] - piped["span_s"], 3)
        out[f"host_ms_per_clip_holding_device_at_{tag}"] = round(1000 * piped["critical_s"] / clips, 3)
        if args.device == "cuda":
            break
    first = "real_model" if args.device == "cuda" else f"{MS_PER_CLIP_512[0]:g}ms"
    out["host_ms_per_clip_serial"] = out[f"host_ms_per_clip_serial_at_{first}"]
    out["host_ms_per_clip_critical_path"] = out[f"host_ms_per_clip_critical_path_at_{first}"]
    out.update(qa_clip(shape))
    print(f"{out['size']}: {n} clips/unit; host ms/clip serial {out['host_ms_per_clip_serial']}, critical path "
          f"{out['host_ms_per_clip_critical_path']}; busy " + ", ".join(
              f"{k.removeprefix('busy_fraction_at_')} {v:.3f}" for k, v in out.items()
              if k.startswith("busy_fraction_at_")) + f"; QA clip {out['qa_ms_float64_before']:.0f} -> "
          f"{out['qa_ms_now']:.0f} ms ({out['qa_speedup']:.0f}x)", flush=True)
    return out


def real_encoder(args) -> LatentEncoder:
    vae = WFVAE(WFVAEConfig.preset(args.preset)).to("cuda")
    return LatentEncoder(vae, "bf16", chunk_frames=None)


def ssim_float64(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5, planes: int = 6) -> float:
    """The SSIM formula as the QA check computed it before (float64, an 11x11 window per moment),
    `planes` frame-channel planes at a time: whole 33x512² clips at once need more than this
    machine's 24 GiB (the CPU convolution unfolds every window)."""
    x = ((a.clamp(-1, 1) + 1) / 2).double().transpose(1, 2).flatten(0, 2).unsqueeze(1)
    y = ((b.clamp(-1, 1) + 1) / 2).double().transpose(1, 2).flatten(0, 2).unsqueeze(1)
    maps = [_ssim_float64_map(x[lo:lo + planes], y[lo:lo + planes], window, sigma) for lo in range(0, len(x), planes)]
    return torch.cat(maps).mean().item()


def _ssim_float64_map(x: torch.Tensor, y: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - window // 2) ** 2) / (2 * sigma ** 2))
    kernel = ((g / g.sum())[:, None] * (g / g.sum())[None, :])[None, None]
    mx, my = F.conv2d(x, kernel), F.conv2d(y, kernel)
    vx, vy = F.conv2d(x * x, kernel) - mx ** 2, F.conv2d(y * y, kernel) - my ** 2
    cxy = F.conv2d(x * y, kernel) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))


def psnr_float64(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss((a.double().clamp(-1, 1) + 1) / 2, (b.double().clamp(-1, 1) + 1) / 2).item()
    return float("inf") if mse == 0 else -10.0 * np.log10(mse)


def qa_clip(shape) -> dict:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, *shape, generator=g) * 2 - 1
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    start = time.perf_counter()
    before = (psnr_float64(a, b), ssim_float64(a, b))
    t_before = time.perf_counter() - start
    start = time.perf_counter()
    now = (psnr(a, b), ssim(a, b))
    t_now = time.perf_counter() - start
    return {"qa_ms_float64_before": round(1000 * t_before, 1), "qa_ms_now": round(1000 * t_now, 1),
            "qa_speedup": round(t_before / t_now, 1), "qa_abs_diff_ssim": abs(before[1] - now[1]),
            "qa_abs_diff_psnr": abs(before[0] - now[0])}


def plot(out: dict, path) -> None:
    fig, ax = axes(7, 4)
    cases = out["cases"]
    xs = np.arange(len(cases))
    ax.bar(xs - 0.2, [c["host_ms_per_clip_serial"] for c in cases], 0.4, label="serial loop")
    ax.bar(xs + 0.2, [c["host_ms_per_clip_critical_path"] for c in cases], 0.4, label="pipelined (now)")
    ax.set_xticks(xs, [c["size"] for c in cases])
    save_plot(fig, ax, path, f"Host work on the device's critical path ({out['device']})", "ms per clip")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="wfvae-l-16chn")
    p.add_argument("--sizes", default="33x256x256,33x512x512")
    p.add_argument("--units", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", help="JSON path (default: results/actor_<device>.json)")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    out = {"environment": environment(args.device), "device": args.device, "units_in_flight": UNITS_IN_FLIGHT,
           "model": ("fixed-time stand-in (sleeps 25 or 50 ms per clip at 33x512², the same per pixel at 256²); "
                     "the actor's code around it is real") if args.device == "cpu" else
                    f"{args.preset}, random weights, bf16",
           "cases": []}
    with tempfile.TemporaryDirectory() as folder:
        for shape in shapes:
            out["cases"].append(case(shape, args, folder))
    name = f"actor_{args.device}"
    path = write_json(name, out) if not args.out else args.out
    if not args.out:
        plot(out, RESULTS / f"{name}.png")
    else:
        import json
        from pathlib import Path
        Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"-> {path}")
    return out


if __name__ == "__main__":
    main()
