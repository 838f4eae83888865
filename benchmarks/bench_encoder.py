"""Encoder throughput, latency, peak memory and achieved TFLOP/s: ours (LatentEncoder, fp32 and bf16)
beside the official WF-VAE code and diffusers' CogVideoX and Wan VAEs, in one run.

    # on an H100/H200 (official code: a local checkout of github.com/PKU-YuanGroup/WF-VAE, not committed)
    python -m benchmarks.bench_encoder --official-repo /path/to/WF-VAE
    # CPU smoke run (what tests/test_benchmarks.py runs): tiny model, tiny shapes
    python -m benchmarks.bench_encoder --smoke --device cpu

All models have random weights (speed does not depend on them); every implementation gets the same
uint8 clips: ours takes them as uint8 (its pipeline input), the others as float in [-1, 1] made
outside the timed region. Per (impl, model, shape, batch, dtype): median latency of --repeats runs
after --warmup (CUDA events), clips/s, peak memory, FLOPs counted once by torch's FlopCounterMode,
TFLOP/s and its fraction of the device's measured matmul peak (bf16 on GPU, fp32 on CPU), and per
(impl, model, shape) the relative L2 error of the bf16 latent mean against fp32. Tiling and slicing
of the diffusers models are off. One JSON record per measurement in
benchmarks/results/encoder_<device>.json, and a plot of latency per clip against peak memory per
clip (as the paper's Fig. 4).
"""
import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import RESULTS, axes, environment, median_time, peak_memory, save_plot
from encoder_service.encode.engine import LatentEncoder
from encoder_service.model import WFVAE
from encoder_service.model.config import PRESETS, WFVAEConfig
from encoder_service.options import PRECISIONS, stored_dtype


def precision_of(dtype_name: str) -> str:
    """Our precision policy computing in this dtype (fp32 with TF32 off for float32)."""
    return next(p.name for p in PRECISIONS.values() if p.compute == stored_dtype(dtype_name) and not p.tf32)

REFERENCE_CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "data"  # released config.json files


# ---- implementations: build(model_name, dtype, device) -> encode(uint8 (B,T,H,W,3) on device) -> mean

def build_ours(model, dtype, device, args, compile=False, cuda_graphs=False):
    vae = WFVAE(smoke_config() if model == "smoke" else PRESETS[model]).to(device)
    engine = LatentEncoder(vae, precision_of(dtype), chunk_frames=args.chunk_frames, compile=compile,
                           cuda_graphs=cuda_graphs)
    return lambda frames: engine.encode(frames).mean


def build_ours_compiled(model, dtype, device, args):
    """LatentEncoder(compile=True): the warm-up calls compile, the timed ones run the compiled graph."""
    return build_ours(model, dtype, device, args, compile=True)


def build_official(model, dtype, device, args):
    if not args.official_repo:
        raise RuntimeError("not run: pass --official-repo (a checkout of PKU-YuanGroup/WF-VAE)")
    sys.path.insert(0, args.official_repo)
    from causalvideovae.model.vae.modeling_wfvae import WFVAEModel
    config = json.loads((REFERENCE_CONFIGS / f"{model}.config.json").read_text())
    vae = WFVAEModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    vae = vae.to(device, stored_dtype(dtype)).eval()
    return _float_input(lambda x: _mean(vae.encode(x)), stored_dtype(dtype))


def build_diffusers(cls_name):
    def build(model, dtype, device, args):
        import diffusers
        vae = getattr(diffusers, cls_name)().to(device, stored_dtype(dtype)).eval()
        vae.disable_tiling()
        vae.disable_slicing()
        return _float_input(lambda x: vae.encode(x).latent_dist.mean, stored_dtype(dtype))
    return build


def build_ours_graphed(model, dtype, device, args):
    """LatentEncoder(cuda_graphs=True): the warm-up calls capture, the timed ones replay."""
    return build_ours(model, dtype, device, args, cuda_graphs=True)


IMPLS = {"ours": build_ours, "ours_compiled": build_ours_compiled, "ours_graphed": build_ours_graphed,
         "official": build_official,
         "cogvideox": build_diffusers("AutoencoderKLCogVideoX"),
         "wan": build_diffusers("AutoencoderKLWan")}
OTHER_MODELS = {"cogvideox": "cogvideox-vae", "wan": "wan2.1-vae"}  # their own architecture, default config


def _float_input(encode, dtype):
    """The float copy of the clips is made once per input, outside the timed call."""
    cache = {}

    def run(frames):
        key = frames.data_ptr()
        if key not in cache:
            cache.clear()
            cache[key] = frames.permute(0, 4, 1, 2, 3).to(dtype).div(127.5).sub(1)
        return encode(cache[key])
    return run


def _mean(posterior):
    posterior = getattr(posterior, "latent_dist", posterior)
    return posterior.mode() if hasattr(posterior, "mode") else posterior.mean


def smoke_config() -> WFVAEConfig:
    return WFVAEConfig(name="smoke", base_channels=16, encoder_energy_flow_hidden_size=8,
                       decoder_energy_flow_hidden_size=8, latent_dim=4, encoder_num_resblocks=1,
                       decoder_num_resblocks=1, scale=(1.0,) * 4, shift=(0.0,) * 4)


# ---- measurement

def matmul_peak_tflops(device: str, dtype: torch.dtype) -> float:
    n = 8192 if device.startswith("cuda") else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / median_time(lambda: a @ b, device, 3, 10) / 1e12


def count_flops(encode, frames) -> float:
    with FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"):
        encode(frames)  # (a compiled encoder runs eagerly here: a dispatch mode cannot run compiled code)
    return float(counter.get_total_flops())


def measure(encode, frames, device, args) -> dict:
    with torch.no_grad():
        seconds = median_time(lambda: encode(frames), device, args.warmup, args.repeats)
        # the CPU's memory tracker is a dispatch mode too: a compiled encoder's peak is its eager one there
        stance = "default" if device.startswith("cuda") else "force_eager"
        with torch.compiler.set_stance(stance):
            mem = peak_memory(lambda: encode(frames), device)
        flops = count_flops(encode, frames)
    batch = frames.shape[0]
    return {"latency_ms": seconds * 1e3, "latency_per_clip_ms": seconds * 1e3 / batch, "clips_per_s": batch / seconds,
            "frames_per_s": batch * frames.shape[1] / seconds, "peak_mem_bytes": int(mem),
            "peak_mem_per_clip_bytes": int(mem / batch), "flops_per_clip": flops / batch,
            "tflops": flops / seconds / 1e12}


def clips(shape, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t, h, w = shape
    return torch.randint(0, 256, (batch, t, h, w, 3), dtype=torch.uint8, generator=g).to(device)


def rel_l2(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def run_impl(impl, model, args, peak, records):
    device = args.device
    for shape in args.shapes:
        means = {}
        for dtype in args.dtypes:
            try:
                torch.manual_seed(0)  # the same random weights for fp32 and bf16
                encode = IMPLS[impl](model, dtype, device, args)
            except Exception as exc:  # noqa: BLE001 - an unavailable comparison is recorded, not fatal
                records.append(_base(impl, model, shape, None, dtype, device) | {"status": f"unavailable: {exc}"})
                break
            for batch in args.batches:
                rec = _base(impl, model, shape, batch, dtype, device)
                try:
                    frames = clips(shape, batch, device)
                    rec |= measure(encode, frames, device, args) | {"status": "ok"}
                    rec["fraction_of_matmul_peak"] = rec["tflops"] / peak
                    if batch == args.batches[0]:
                        with torch.no_grad():
                            means[dtype] = encode(frames).float().cpu()
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory at a large batch
                    rec["status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
                    if args.verbose:
                        traceback.print_exc()
                records.append(rec)
                print(json.dumps({k: rec.get(k) for k in ("impl", "model", "shape", "batch", "dtype", "latency_ms",
                                                           "clips_per_s", "peak_mem_bytes", "tflops", "status")}),
                      flush=True)
            del encode
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        if "bfloat16" in means and "float32" in means:
            err = rel_l2(means["bfloat16"], means["float32"])
            for rec in records:
                if (rec["impl"], rec["model"], rec["shape"], rec["dtype"]) == (impl, model, list(shape), "bfloat16"):
                    rec["bf16_vs_fp32_rel_l2"] = err


def _base(impl, model, shape, batch, dtype, device):
    return {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "torch": torch.__version__,
            "impl": impl, "model": OTHER_MODELS.get(impl, model), "shape": list(shape), "batch": batch, "dtype": dtype}


def plot(records, path: Path, shape) -> None:
    fig, ax = axes(7, 5)
    for rec in records:
        if rec.get("status") == "ok" and rec["shape"] == list(shape) and rec["dtype"] == "bfloat16":
            ax.scatter(rec["latency_per_clip_ms"], rec["peak_mem_per_clip_bytes"] / 2 ** 30,
                       label=f"{rec['impl']} {rec['model']} b{rec['batch']}")
    ax.set_xlabel("encode latency per clip (ms)")
    save_plot(fig, ax, path, f"bf16 encode, {'x'.join(map(str, shape))}", "peak memory per clip (GiB)")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--models", nargs="+", default=["wfvae-l-16chn", "wfvae-s-8chn"])
    p.add_argument("--shapes", nargs="+", default=["33x256x256", "33x512x512", "65x512x512", "33x720x1280"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"],
                   help="compute dtypes (ours: the bf16 and fp32 precision policies)")
    p.add_argument("--chunk-frames", default="auto", help="ours: frames per causal-cache chunk, or auto")
    p.add_argument("--official-repo", help="local checkout of PKU-YuanGroup/WF-VAE")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny model and shapes (CPU check of the script)")
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/encoder_<device>.json)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.shapes, args.batches, args.warmup, args.repeats = ["smoke"], ["9x32x32"], [1, 2], 1, 2
        args.impls = [i for i in args.impls if i == "ours"]
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    args.chunk_frames = None if args.chunk_frames == "none" else (
        "auto" if args.chunk_frames == "auto" else int(args.chunk_frames))
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    peak = matmul_peak_tflops(args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    print(f"measured matmul peak: {peak:.1f} TFLOP/s", flush=True)
    records = []
    for impl in args.impls:
        for model in ([args.models[0]] if impl in OTHER_MODELS else args.models):
            run_impl(impl, model, args, peak, records)
    out = Path(args.out) if args.out else RESULTS / f"encoder_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(args.device), "matmul_peak_tflops": peak,
                               "matmul_peak_dtype": "bfloat16" if args.device.startswith("cuda") else "float32",
                               "records": records}, indent=1))
    plot(records, out.with_suffix(".png"), args.shapes[min(1, len(args.shapes) - 1)])
    return records


if __name__ == "__main__":
    main()
