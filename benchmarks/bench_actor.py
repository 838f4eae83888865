"""The encoder actor's loop over real units: how much host work stays on the device's critical path,
and how busy the device stays.

Each case builds one real unit row (the Arrow table ingest hands the actor: `--file-mb` 32 of
WF-VAE-L latents, i.e. 56 clips at 33x256², 14 at 33x512²) and runs `--units` of them through the
actor's own code (stages.unit_and_frames, then encode/unit_encoder.UnitEncoder: device copy, model,
latents to rows, statistics, zstd Parquet, sha256, staging file):

    serial      one unit at a time, as the actor's loop was: host work between model calls
    pipelined   UNITS_IN_FLIGHT calls at once, as Ray runs them in the actor now (and 4 for the
                target case)

On the CPU the model is a stand-in (benchmarks/stand_ins.py) with a stated device time per clip:
`sleep` (the thread waits, paying no host work: the kind case) or `host_paying` (the real forward's
op sequence dispatched from Python at tiny width first, holding the GIL between ops, then the rest
of the device time). Device times per clip: 6.25, 9.6 (the target: about 104 clips/s per H100) and
28 ms at 33x256², 25 ms at 33x512²; default settings (batch 4, chunks of 16 frames).

    device busy                 device seconds / time from the first model call's start to the last one's end
    host ms per clip, critical  (that span - device seconds) / clips: what the device waits for
    dispatch ms per clip        the model thread's CPU time in model calls (its share of the GIL, at most)
    finish CPU share            the finishing threads' CPU time / span (rows, tobytes, zstd, sha256, Parquet:
                                an upper bound of their GIL share; zstd and sha256 release it)

With --device cuda the real model runs (--preset, random weights).

Also: PSNR+SSIM of one QA clip, the float64 formula of before against encoder_service.encode.quality.

    python -m benchmarks.bench_actor                # CPU, writes results/actor_cpu.{json,png}
    python -m benchmarks.bench_actor --device cuda  # WF-VAE-L bf16 on the GPU: actor_cuda.json
"""
import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import RESULTS, axes, environment, save_plot, write_json
from benchmarks.op_bytes import NO_WRITE
from benchmarks.stand_ins import LATENT_DIM, STAND_INS, stand_in
from encoder_service.encode.engine import LatentEncoder
from encoder_service.encode.quality import psnr, ssim
from encoder_service.encode.unit_encoder import UNITS_IN_FLIGHT, UnitEncoder
from encoder_service.ingest.units import UnitBuilder, UnitPlan
from encoder_service.job.stages import unit_and_frames
from encoder_service.model import WFVAE, WFVAEConfig
from encoder_service.records import Clip, RunMeta, StageRow, to_table
from encoder_service.table.folder import OutputFolder
from encoder_service.table.writer import UnitWriter

MS_PER_CLIP = {(33, 256, 256): (6.25, 9.6, 28.0), (33, 512, 512): (25.0,)}
TARGET = ((33, 256, 256), 9.6, 4)  # shape, ms per clip, units in flight: device busy >= 0.90 with host_paying


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
    meta = RunMeta("wfvae-l-16chn", "0" * 64, "bf16", "bench", [1.0] * LATENT_DIM, [0.0] * LATENT_DIM, "bench")
    coder = UnitEncoder(encoder, UnitWriter(OutputFolder(folder), meta), meta, batch_size, True)
    model, critical, dispatch, finish = [0.0], [0.0], [0.0], [0.0]
    lock, todo = threading.Lock(), list(range(units))
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
                dispatch[0] += out.timing.dispatch
                finish[0] += out.timing.finish_cpu
                span[0], span[1] = min(span[0], out.timing.first_model), max(span[1], out.timing.last_model)
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "model_s": model[0], "critical_s": critical[0], "span_s": span[1] - span[0],
            "dispatch_s": dispatch[0], "finish_cpu_s": finish[0]}


def ms_per_clip(shape) -> tuple:
    """The stated device times for a shape; other shapes (smoke runs): the target's, per voxel."""
    if shape in MS_PER_CLIP:
        return MS_PER_CLIP[shape]
    t, h, w = TARGET[0]
    return (round(TARGET[1] * shape[0] * shape[1] * shape[2] / (t * h * w), 4),)


def case(shape, kind: str, args, folder: str, table) -> dict:
    n = args.clips_per_unit or clips_per_unit(shape)
    clips = n * args.units
    out = {"size": "x".join(map(str, shape)), "stand_in": kind if args.device == "cpu" else "none",
           "clips_per_unit": n, "units": args.units, "batch_size": args.batch_size, "chunk_frames": 16}
    for ms in ms_per_clip(shape) if args.device == "cpu" else (None,):
        encoder = real_encoder(args) if args.device == "cuda" else stand_in(kind, ms / 1000, shape)
        serial = run(encoder, table, args.units, 1, args.batch_size, folder)
        piped = run(encoder, table, args.units, UNITS_IN_FLIGHT, args.batch_size, folder)
        tag = "real_model" if ms is None else f"{ms:g}ms"
        out[f"model_ms_per_clip_{tag}"] = round(1000 * piped["model_s"] / clips, 3)
        out[f"busy_fraction_serial_at_{tag}"] = round(serial["model_s"] / serial["span_s"], 4)
        out[f"busy_fraction_at_{tag}"] = round(piped["model_s"] / piped["span_s"], 4)
        out[f"host_ms_per_clip_serial_at_{tag}"] = round(1000 * (serial["span_s"] - serial["model_s"]) / clips, 3)
        out[f"host_ms_per_clip_critical_path_at_{tag}"] = round(1000 * (piped["span_s"] - piped["model_s"]) / clips, 3)
        out[f"fill_and_drain_s_at_{tag}"] = round(piped["wall_s"] - piped["span_s"], 3)
        out[f"host_ms_per_clip_holding_device_at_{tag}"] = round(1000 * piped["critical_s"] / clips, 3)
        out[f"dispatch_ms_per_clip_at_{tag}"] = round(1000 * piped["dispatch_s"] / clips, 3)
        out[f"finish_cpu_share_at_{tag}"] = round(piped["finish_cpu_s"] / piped["span_s"], 4)
        if (shape, ms) == TARGET[:2]:
            four = run(encoder, table, args.units, TARGET[2], args.batch_size, folder)
            out[f"busy_fraction_at_{tag}_{TARGET[2]}_in_flight"] = round(four["model_s"] / four["span_s"], 4)
            out[f"host_ms_per_clip_critical_path_at_{tag}_{TARGET[2]}_in_flight"] = round(
                1000 * (four["span_s"] - four["model_s"]) / clips, 3)
    first = next(k.removeprefix("busy_fraction_at_") for k in out if k.startswith("busy_fraction_at_"))
    out["host_ms_per_clip_serial"] = out[f"host_ms_per_clip_serial_at_{first}"]
    out["host_ms_per_clip_critical_path"] = out[f"host_ms_per_clip_critical_path_at_{first}"]
    print(f"{out['size']} {out['stand_in']}: {n} clips/unit; busy " + ", ".join(
        f"{k.removeprefix('busy_fraction_at_')} {v:.3f}" for k, v in out.items() if k.startswith("busy_fraction_at_"))
        + "; host ms/clip on the critical path " + ", ".join(
        f"{k.removeprefix('host_ms_per_clip_critical_path_at_')} {v:.2f}" for k, v in out.items()
        if k.startswith("host_ms_per_clip_critical_path_at_")), flush=True)
    return out


class LaunchCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # views and allocations launch no kernel: what op_bytes counts as writing nothing
        self.launches += not (func.is_view or func.overloadpacket.__name__ in NO_WRITE)
        return func(*args, **(kwargs or {}))


def launch_counts(batch: int = 4, free_gib: float = 80.0) -> list[dict]:
    """Kernel launches per encoder call (aten ops that are not views or allocations, as a
    TorchDispatchMode sees them: the ops a CUDA run launches, a Triton kernel counted once) for
    WF-VAE-L's structure at tiny width, at the chunking `--chunk-frames auto` picks for 33x256² and
    33x512² with `free_gib` free (an 80 GB card), and at chunks of 8 and 16; eager against
    --cuda-graphs (one replay per whole-clip call or steady chunk, the first chunk eager)."""
    from benchmarks.stand_ins import TINY_L
    from encoder_service.encode.engine import frames_that_fit
    from encoder_service.model.cache import CausalCache
    from encoder_service.model.graphs import GraphedEncoder
    torch.manual_seed(0)
    vae = WFVAE(TINY_L).eval()
    out = []
    for t, h, w in ((33, 256, 256), (33, 512, 512)):
        auto = frames_that_fit(int(free_gib * 2**30), batch * h * w, torch.bfloat16)
        for label, chunk in ((f"auto ({free_gib:g} GiB free)", auto), ("8", 8), ("16", 16)):
            chunk = chunk if chunk and t > chunk + 1 else None
            x = torch.zeros(batch, 3, t, 16, 16)
            with torch.no_grad(), LaunchCount() as eager:
                vae.encode(x, chunk_frames=chunk)
            graphs = GraphedEncoder(vae.encoder, capture=False)
            with torch.no_grad():
                graphs(x, chunk)
            steady = None
            if chunk:
                cache = CausalCache()
                with torch.no_grad():
                    vae.encoder(x[:, :, :chunk + 1], cache)
                    with LaunchCount() as step:
                        vae.encoder(x[:, :, chunk + 1:2 * chunk + 1], cache)
                steady = step.launches
            first = 0
            if chunk:
                with torch.no_grad(), LaunchCount() as head:
                    vae.encoder(x[:, :, :chunk + 1], CausalCache())
                first = head.launches
            out.append({"size": f"{t}x{h}x{w}", "batch": batch, "chunk_frames": label,
                        "chunk_frames_used": chunk or "whole clip", "eager_launches_per_call": eager.launches,
                        "eager_launches_per_steady_chunk": steady,
                        "graphed_launches_per_call": first + graphs.replays + (graphs.eager - 1 if chunk else 0),
                        "graph_replays_per_steady_chunk": 1 if chunk else None})
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
    fig, ax = axes(8, 4)
    bars = [(f"{c['size']}\n{c['stand_in']}\n{k.removeprefix('busy_fraction_at_')}", v) for c in out["cases"]
            for k, v in c.items() if k.startswith("busy_fraction_at_")]
    xs = np.arange(len(bars))
    ax.bar(xs, [v for _, v in bars], 0.6)
    ax.axhline(0.9, color="k", lw=0.8, ls="--", label="target 0.90")
    ax.set_xticks(xs, [label for label, _ in bars], fontsize=6)
    save_plot(fig, ax, path, f"Device busy, pipelined actor ({out['device']})", "device busy fraction")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="wfvae-l-16chn")
    p.add_argument("--sizes", default="33x256x256,33x512x512")
    p.add_argument("--stand-ins", default=",".join(STAND_INS), help="CPU: which stand-ins (sleep, host_paying)")
    p.add_argument("--units", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--clips-per-unit", type=int, help="fewer clips per unit than --file-mb 32 gives (smoke runs)")
    p.add_argument("--out", help="JSON path (default: results/actor_<device>.json)")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    kinds = args.stand_ins.split(",") if args.device == "cpu" else ["none"]
    out = {"environment": environment(args.device), "device": args.device, "units_in_flight": UNITS_IN_FLIGHT,
           "model": ("stand-ins with a stated device time per clip (benchmarks/stand_ins.py): sleep, or "
                     "host_paying (the real forward's op sequence at tiny width, then the rest of the device "
                     "time); the actor's code around them is real") if args.device == "cpu" else
                    f"{args.preset}, random weights, bf16",
           "target": {"size": "x".join(map(str, TARGET[0])), "ms_per_clip": TARGET[1], "units_in_flight": TARGET[2],
                      "stand_in": "host_paying", "device_busy_at_least": 0.90},
           "cases": []}
    if args.device == "cpu":
        out["launches"] = launch_counts()
        for row in out["launches"]:
            print(f"launches {row['size']} chunks {row['chunk_frames']}: eager {row['eager_launches_per_call']} per "
                  f"call ({row['eager_launches_per_steady_chunk']} per steady chunk), --cuda-graphs "
                  f"{row['graphed_launches_per_call']}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for shape in shapes:
            table = unit_table(shape, args.clips_per_unit or clips_per_unit(shape))
            for kind in kinds:
                out["cases"].append(case(shape, kind, args, folder, table))
            out["cases"][-1].update(qa_clip(shape))
    name = f"actor_{args.device}"
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
        path = args.out
    else:
        path = write_json(name, out)
        plot(out, RESULTS / f"{name}.png")
    print(f"-> {path}")
    return out


if __name__ == "__main__":
    main()
