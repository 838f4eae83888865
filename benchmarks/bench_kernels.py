"""Memory-bound kernels: Triton vs the PyTorch reference vs the official formulation, as achieved
GB/s against the device's measured copy bandwidth (issue target: >= 70 % for the Haar pyramid and
LayerNorm+SiLU on an H100/H200).

    python -m benchmarks.bench_kernels --device cuda                 # WF-VAE-L sizes, 33x512x512
    python -m benchmarks.bench_kernels --device cpu --frames 9 --size 64 --channels 32   # CPU, no Triton

Bytes are the ideal traffic (every input read once, every output written once). The "official"
rows re-create the released code's formulation from the spec: the 3D Haar transform as eight
single-filter conv3d calls in a Python loop over batch x channel slices, the 2D one likewise with
four filters; LayerNorm as permute to channels-last, F.layer_norm, permute back, then SiLU.
Writes benchmarks/results/kernels_<device>.json and a bar plot.
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, axes, environment, median_time, save_plot, write_json
from encoder_service import options
from kernels import haar_reference, norm_reference
from kernels.haar_reference import HAAR2D_TAP, HAAR3D_TAP


def _filters(n_dims: int, tap: float, device, dtype) -> torch.Tensor:
    """The official per-sub-band filters: sign pattern (-1)^(band bit . position bit); 3D order
    s = 4*tau + 2*eta + omega."""
    bands = []
    for s in range(2 ** n_dims):
        bits = [(s >> (n_dims - 1 - i)) & 1 for i in range(n_dims)]
        f = torch.ones([2] * n_dims)
        for axis, bit in enumerate(bits):
            if bit:
                sign = torch.tensor([1.0, -1.0]).reshape([2 if a == axis else 1 for a in range(n_dims)])
                f = f * sign
        bands.append(f * tap)
    if n_dims == 2:  # 2D sub-band order is k = eta + 2*omega (LL, height-high, width-high, HH)
        bands = [bands[0], bands[2], bands[1], bands[3]]
    return torch.stack(bands).unsqueeze(1).to(device, dtype)


def official_haar3d(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    b, c = x.shape[:2]
    x = torch.cat([x[:, :, :1], x], dim=2)
    slices = [torch.cat([F.conv3d(x[i // c, i % c][None, None], filters[k:k + 1], stride=2) for k in range(8)], 1)
              for i in range(b * c)]  # the released code loops over batch x channel slices
    return torch.cat(slices).unflatten(0, (b, c)).transpose(1, 2).flatten(1, 2)  # channel = band * C + c


def official_haar2d(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t * c, 1, h, w)
    out = torch.cat([F.conv2d(frames, filters[k:k + 1], stride=2) for k in range(4)], dim=1)
    return out.reshape(b, t, c, 4, h // 2, w // 2).permute(0, 3, 2, 1, 4, 5).flatten(1, 2)  # band * C + c


def official_pyramid(x, f3, f2):
    coeffs = official_haar3d(x, f3)
    l1 = official_haar2d(coeffs[:, :3], f2)
    return coeffs, l1, official_haar3d(l1[:, :3], f3)


def official_layer_norm_silu(x, weight, bias):
    y = F.layer_norm(x.permute(0, 2, 3, 4, 1), (x.shape[1],), weight, bias, 1e-6).permute(0, 4, 1, 2, 3)
    return F.silu(y)


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    n = (1 << 30 if device.startswith("cuda") else 1 << 26) // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    return 2 * src.numel() * 4 / median_time(lambda: dst.copy_(src), device, 2, repeats)


def cases(args, device, dtype):
    b, t, s, c = args.batch, args.frames, args.size, args.channels
    video = torch.rand(b, 3, t, s, s, device=device).mul(2).sub(1).to(dtype)
    frames = torch.randint(0, 256, (b, t, s, s, 3), dtype=torch.uint8, device=device)
    act = torch.randn(b, c, (t + 1) // 2, s // 2, s // 2, device=device, dtype=dtype)
    w, bias = torch.ones(c, device=device, dtype=dtype), torch.zeros(c, device=device, dtype=dtype)
    coeffs = torch.randn(b, 24, (t + 1) // 2, s // 2, s // 2, device=device, dtype=dtype)
    low = torch.randn(b, 3, (t + 1) // 2, s // 2, s // 2, device=device, dtype=dtype)
    f3, f2 = _filters(3, HAAR3D_TAP, device, dtype), _filters(2, HAAR2D_TAP, device, dtype)
    esize = torch.finfo(dtype).bits // 8
    pyr_out = (24 + 12 / 4 + 24 / 16 / 2) * coeffs[:, :1].numel() * esize  # level 0 + 1 + 2 elements
    return {
        "haar_pyramid": (lambda m: m.haar_pyramid(video), video.numel() * esize + pyr_out,
                         lambda: official_pyramid(video, f3, f2)),
        "haar_pyramid_uint8": (lambda m: m.haar_pyramid(frames.permute(0, 4, 1, 2, 3), True, dtype),
                               frames.numel() + pyr_out, None),
        "channel_layer_norm_silu": (lambda m: m.channel_layer_norm(act, w, bias, 1e-6, True),
                                    2 * act.numel() * esize, lambda: official_layer_norm_silu(act, w, bias)),
        "inverse_haar3d_add": (lambda m: m.inverse_haar3d(coeffs, True, low),
                               (coeffs.numel() + low.numel() + coeffs.numel()) * esize, None),
    }


def run(args) -> dict:
    device, dtype = args.device, options.dtype(args.dtype)
    impls = {"reference": haar_and_norm_reference()}
    if device.startswith("cuda"):
        import kernels.triton_ops as triton_ops
        impls["triton"] = triton_ops
    bandwidth = copy_bandwidth(device, args.repeats)
    rows = []
    for name, (call, nbytes, official) in cases(args, device, dtype).items():
        fns = {impl: (lambda m=m, call=call: call(m)) for impl, m in impls.items()}
        if official is not None:
            fns["official"] = official
        for impl, fn in fns.items():
            seconds = median_time(fn, device, args.warmup, args.repeats)
            rows.append({"kernel": name, "impl": impl, "seconds": seconds, "bytes": int(nbytes),
                         "gb_per_s": nbytes / seconds / 1e9, "fraction_of_copy": nbytes / seconds / bandwidth})
            print(f"{name:26s} {impl:10s} {seconds * 1e3:9.3f} ms {nbytes / seconds / 1e9:8.1f} GB/s "
                  f"({nbytes / seconds / bandwidth:.0%} of copy)", flush=True)
    return {"environment": environment(device), "dtype": args.dtype, "copy_gb_per_s": bandwidth / 1e9,
            "shape": {"batch": args.batch, "frames": args.frames, "size": args.size, "channels": args.channels},
            "results": rows}


class haar_and_norm_reference:  # noqa: N801 - a module-like namespace of the references
    haar_pyramid = staticmethod(haar_reference.haar_pyramid)
    inverse_haar3d = staticmethod(haar_reference.inverse_haar3d)
    channel_layer_norm = staticmethod(norm_reference.channel_layer_norm)


def plot(payload: dict, path: Path) -> None:
    fig, ax = axes(8, 4)
    kernels = sorted({r["kernel"] for r in payload["results"]})
    impls = ["official", "reference", "triton"]
    for i, impl in enumerate(impls):
        vals = {r["kernel"]: r["gb_per_s"] for r in payload["results"] if r["impl"] == impl}
        if not vals:
            continue
        xs = [k + (i - 1) * 0.27 for k in range(len(kernels)) if kernels[k] in vals]
        ax.bar(xs, [vals[k] for k in kernels if k in vals], width=0.27, label=impl, color=f"C{i}")
    ax.axhline(payload["copy_gb_per_s"], color="k", ls="--", label="copy bandwidth")
    ax.axhline(0.7 * payload["copy_gb_per_s"], color="grey", ls=":", label="70 % target")
    ax.set_xticks(range(len(kernels)), kernels, rotation=15, fontsize=8)
    save_plot(fig, ax, path, f"{payload['environment']['device']}, {payload['dtype']}", "GB/s (ideal traffic)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--channels", type=int, default=128, help="LayerNorm channels (WF-VAE-L's first stage)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None, help="result name (default kernels_<device>)")
    args = p.parse_args(argv)
    payload = run(args)
    name = args.out or f"kernels_{args.device.split(':')[0]}"
    write_json(name, payload)
    plot(payload, RESULTS / f"{name}.png")
    return payload


if __name__ == "__main__":
    main()
