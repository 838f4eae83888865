"""Peak memory of chunked (causal-cache) encode and decode versus clip length.

    python -m benchmarks.bench_chunk_memory                     # CPU, small model, 64x64
    python -m benchmarks.bench_chunk_memory --device cuda --preset wfvae-l-16chn --size 256

At a fixed chunk size the peak must not grow with the clip (target: T=257 within 1.2x of T=33);
whole-clip inference is measured beside it for contrast. Chunked encode is `vae.encode(x,
chunk_frames=N)` (its output, the latents, is small); chunked decode is the decoder stream with
each piece of video handed on as it comes, as a writer would (a decode that keeps the whole video
needs O(T) memory for the result itself). Writes benchmarks/results/<name>.json
and a plot. Peak = bytes allocated during the call beyond what existed before (weights, input).
"""
import argparse

import torch

from benchmarks.common import RESULTS, axes, environment, peak_memory, save_plot, write_json
from encoder_service import WFVAE, WFVAEConfig

SMALL = WFVAEConfig(latent_dim=8, base_channels=16, encoder_energy_flow_hidden_size=16,
                    decoder_energy_flow_hidden_size=16, connect_res_layer_num=2, scale=(0.18215,) * 8,
                    shift=(0.0,) * 8, name="small-s")


def measure(vae, t, size, device, chunk_frames, chunk_latents, whole):
    x = torch.rand(1, 3, t, size, size, device=device) * 2 - 1
    z = torch.randn(1, vae.config.latent_dim, (t - 1) // 4 + 1, size // 8, size // 8, device=device)
    rows = []
    plans = [("chunked", chunk_frames, chunk_latents)] + ([("whole", None, None)] if whole else [])
    for mode, cf, cl in plans:
        rows.append({"mode": mode, "T": t, "chunk_frames": cf, "chunk_latents": cl, "op": "encode",
                     "peak_bytes": peak_memory(lambda cf=cf: vae.encode(x, chunk_frames=cf), device)})
        decode = (lambda: vae.decode(z)) if cl is None else (lambda cl=cl: stream_decode(vae, z, cl))
        rows.append({"mode": mode, "T": t, "chunk_frames": cf, "chunk_latents": cl, "op": "decode",
                     "peak_bytes": peak_memory(decode, device)})
    return rows


def stream_decode(vae, z, chunk_latents):
    """Decode as a consumer would that writes frames out as they come (nothing kept)."""
    stream, frames = vae.decode_stream(chunk_latents), 0
    for i in range(0, z.shape[2], chunk_latents):
        out = stream.push(z[:, :, i:i + chunk_latents])
        frames += 0 if out is None else out.shape[2]
    frames += stream.close().shape[2]
    assert frames == 4 * (z.shape[2] - 1) + 1


def plot(rows, path):
    fig, ax = axes(6, 4)
    for op in ("encode", "decode"):
        for mode, style in (("chunked", "-o"), ("whole", "--x")):
            pts = [(r["T"], r["peak_bytes"] / 2 ** 20) for r in rows if r["op"] == op and r["mode"] == mode]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{op} ({mode})")
    ax.set_xlabel("clip length T (frames)")
    save_plot(fig, ax, path, "WF-VAE causal-cache memory vs clip length", "peak activation memory (MiB)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", help="released config to build with random weights (default: a small config)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--lengths", default="33,65,129,257")
    p.add_argument("--chunk-frames", type=int, default=8)
    p.add_argument("--chunk-latents", type=int, default=2)
    p.add_argument("--whole-up-to", type=int, default=129, help="also measure whole-clip inference up to this T")
    p.add_argument("--name", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    vae = WFVAE(WFVAEConfig.preset(args.preset) if args.preset else SMALL).to(args.device, dtype).eval()
    rows = []
    with torch.no_grad():
        for t in (int(v) for v in args.lengths.split(",")):
            rows += measure(vae, t, args.size, args.device, args.chunk_frames, args.chunk_latents,
                            whole=t <= args.whole_up_to)
            print(" ".join(f"{r['op']}/{r['mode']} T={t}: {r['peak_bytes'] / 2**20:.1f} MiB"
                           for r in rows if r["T"] == t))
    growth = {op: max(r["peak_bytes"] for r in rows if r["op"] == op and r["mode"] == "chunked")
              / min(r["peak_bytes"] for r in rows if r["op"] == op and r["mode"] == "chunked")
              for op in ("encode", "decode")}
    print("chunked peak growth, longest / shortest clip:", {k: round(v, 3) for k, v in growth.items()})
    name = args.name or f"chunk_memory_{'gpu' if args.device.startswith('cuda') else 'cpu'}"
    write_json(name, {"benchmark": "chunk_memory", "env": environment(args.device), "config": vae.config.name,
                      "size": [args.size, args.size], "dtype": str(dtype), "growth_chunked": growth, "rows": rows})
    plot(rows, RESULTS / f"{name}.png")
    print("wrote", RESULTS / f"{name}.json")


if __name__ == "__main__":
    main()
