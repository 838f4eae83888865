"""What the encoder's forward pass writes, op by op: bytes by class (conv, data movement,
elementwise, norm, attention, Triton kernels) and the layout every convolution receives, for our
engine on its GPU path (channels_last_3d weights, Triton kernels) and the official WF-VAE code,
whole clip and chunked, WF-VAE-L and -S, in one run.

These are device-independent counts (a TorchDispatchMode sees the same aten ops on any device;
Triton kernels run in the interpreter off CUDA and count as one op writing their outputs), not
times: they say what a GPU would have to move, measured without one.

    TRITON_INTERPRET=1 python -m benchmarks.bench_bytes [--official-repo .official/WF-VAE]
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (no effect on a CUDA machine run)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import kernels  # noqa: E402
from benchmarks.common import environment, write_json  # noqa: E402
from benchmarks.op_bytes import OpBytes, counting_triton_kernels  # noqa: E402
from encoder_service.encode.engine import LatentEncoder  # noqa: E402
from encoder_service.model import WFVAE  # noqa: E402
from encoder_service.model.config import PRESETS  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "data"


def account_ours(preset: str, frames: torch.Tensor, chunk: int | None, device: str = "cpu") -> dict:
    """Our LatentEncoder as it runs on CUDA: channels_last_3d, Triton kernels, float32 weights."""
    kernels.use_backend("triton")
    engine = LatentEncoder(WFVAE(PRESETS[preset]).to(device), "fp32", chunk_frames=chunk, channels_last=True)
    x = engine.to_device(frames.to(device))
    with OpBytes() as mode, counting_triton_kernels(mode):
        engine.forward(x)
    return mode.account.summary()


def account_official(repo: str, preset: str, frames: torch.Tensor, chunk: int | None) -> dict:
    """The official WFVAEModel (channels_last_3d weights too, for a like-for-like layout count);
    its chunked mode is enable_tiling() with t_chunk_enc frames."""
    sys.path.insert(0, repo)
    from causalvideovae.model.vae.modeling_wfvae import WFVAEModel
    config = json.loads((CONFIGS / f"{preset}.config.json").read_text())
    vae = WFVAEModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    for p in vae.parameters():
        if p.ndim == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    x = frames.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
    if chunk:  # its causal cache ("tiling"), chunks of `chunk` frames after the first
        vae.enable_tiling()
        vae.temporal_size, vae.t_chunk_enc = x.shape[2], chunk
    with torch.no_grad(), OpBytes() as mode:
        vae.encode(x)
    return mode.account.summary()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["wfvae-l-16chn", "wfvae-s-8chn"])
    p.add_argument("--shape", default="17x64x64", help="frames x height x width of the clip")
    p.add_argument("--chunk", type=int, default=8, help="frames per chunk for the chunked runs")
    p.add_argument("--official-repo", help="a checkout of PKU-YuanGroup/WF-VAE (needs diffusers, einops)")
    p.add_argument("--out", default="bytes_cpu")
    args = p.parse_args(argv)
    t, h, w = (int(v) for v in args.shape.split("x"))
    frames = torch.randint(0, 256, (1, t, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    records = []
    for preset in args.presets:
        for chunk in (None, args.chunk):
            mode = "whole" if chunk is None else f"chunked {chunk}"
            accounts = {"ours": account_ours(preset, frames, chunk)}
            if args.official_repo:
                accounts["official"] = account_official(args.official_repo, preset, frames, chunk)
            for impl, account in accounts.items():
                record = {"impl": impl, "preset": preset, "shape": args.shape, "mode": mode, **account}
                records.append(record)
                print(f"{impl:8s} {preset:14s} {mode:10s} convs {record['convolutions']:3d}  input conversions "
                      f"{record['conv_input_conversions']:3d}  movement/conv bytes "
                      f"{record['movement_over_conv_bytes']:.3f}", flush=True)
    path = write_json(args.out, {"environment": environment("cpu"), "note": "device-independent op and byte "
                                 "counts of one forward pass (not times)", "records": records})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
