"""Command line: `python -m encoder_service reconstruct|encode VIDEO --checkpoint PATH ...`,
`python -m encoder_service inspect OUTPUT` and `python -m encoder_service pack SRC OUT` (also
installed as `wfvae`)."""
import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from encoder_service import options, pack
from encoder_service.ingest.decoders import VideoError, get_decoder, probe
from encoder_service.ingest.geometry import plan_geometry
from encoder_service.model import WFVAE, CheckpointError
from encoder_service.quality import psnr, ssim
from encoder_service.table import migrate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m encoder_service", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in [("reconstruct", "encode + decode a video, write it, print PSNR/SSIM"),
                            ("encode", "encode a video to latents (safetensors: mean, logvar)")]:
        s = sub.add_parser(name, help=help_text)
        s.add_argument("video")
        s.add_argument("--checkpoint", required=True, help="WF-VAE folder or weights file")
        s.add_argument("--config", help="preset name or config.json, if none sits next to the weights")
        s.add_argument("--frames", type=options.frames, default=33, help="clip length, 4k+1 (default 33)")
        s.add_argument("--stride", type=int, default=1, help="take every n-th frame (default 1)")
        s.add_argument("--start", type=int, default=0, help="first frame index (default 0)")
        s.add_argument("--size", type=options.size, default=(256, 256), help="HxW after resize + centre crop")
        s.add_argument("--decoder", choices=options.DECODERS, default="pyav")
        s.add_argument("--dtype", type=options.dtype, default="fp32", help=f"one of {', '.join(options.DTYPES)}")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--chunk-frames", type=options.chunk_frames,
                       help="encode with the causal cache, N frames at a time")
        s.add_argument("--out", required=True)
    sub.choices["reconstruct"].add_argument("--chunk-latents", type=int, help="decode M latent frames at a time")
    i = sub.add_parser("inspect", help="what an output folder holds: shards, ledger, statistics, QA")
    i.add_argument("output", help="the job's --output folder (local or s3://)")
    i.add_argument("--input", nargs="+", help="the job's --input, to list pending shards")
    i.add_argument("--s3-endpoint-url")
    i.add_argument("--examples", type=int, default=3, help="example messages per ledger reason")
    i.add_argument("--json", action="store_true", help="the report as JSON")
    pack.add_parser(sub)
    migrate.add_parser(sub)
    return p


def inspect_command(args) -> int:
    from encoder_service.ingest.inputs import InputError
    from encoder_service.inspect import format_report, inspect_folder
    from encoder_service.storage import StorageOptions
    from encoder_service.table.folder import FolderError
    try:
        report = inspect_folder(args.output, args.input, StorageOptions(endpoint_url=args.s3_endpoint_url),
                                args.examples)
    except (InputError, FolderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        print(json.dumps(report, indent=1, sort_keys=True) if args.json else format_report(report), flush=True)
    except BrokenPipeError:  # `inspect ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def load_clip(args) -> tuple[np.ndarray, list[int], float]:
    """uint8 (T, H, W, 3) frames as the job would make them (ingest/geometry.py)."""
    info = probe(args.video)
    indices = list(range(args.start, args.start + args.frames * args.stride, args.stride))
    if indices[-1] >= info.num_frames:
        raise VideoError(f"{args.video}: has {info.num_frames} frames, needs {indices[-1] + 1} for "
                         f"--frames {args.frames} --stride {args.stride} --start {args.start}; "
                         "lower --frames or --stride")
    geometry = plan_geometry((info.height, info.width), info.rotation, args.size)
    _, frames = next(get_decoder(args.decoder).clips(args.video, info, [indices], geometry, None))
    return frames, indices, info.fps / args.stride


def to_model_input(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) or (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]."""
    x = torch.as_tensor(frames)
    if x.ndim == 4:
        x = x.unsqueeze(0)
    return x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def write_video(path: str, frames: np.ndarray, fps: float) -> None:
    """uint8 (T, H, W, 3) -> H.264 file (PyAV)."""
    import av
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=max(1, round(fps)))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.options = "yuv420p", {"crf": "10"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        return inspect_command(args)
    if args.command == "pack":
        return pack.run(args)
    if args.command == "migrate":
        return migrate.run(args)
    try:
        vae = WFVAE.from_pretrained(args.checkpoint, config=args.config, dtype=args.dtype, device=args.device)
        frames, indices, clip_fps = load_clip(args)
    except (CheckpointError, VideoError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    x = to_model_input(frames).to(args.device, args.dtype)
    posterior = vae.encode(x, chunk_frames=args.chunk_frames)
    if args.command == "encode":
        meta = {"video": args.video, "frame_indices": json.dumps(indices), "checkpoint_sha256": vae.checkpoint_sha256,
                "config": json.dumps(vae.config.to_dict()), "size": f"{args.size[0]}x{args.size[1]}"}
        save_file({"mean": posterior.mean.contiguous().cpu(), "logvar": posterior.logvar.contiguous().cpu()},
                  args.out, metadata=meta)
        print(f"latents {tuple(posterior.mean.shape)} -> {args.out}")
        return 0
    rec = vae.decode(posterior.mode(), chunk_latents=args.chunk_latents).float().cpu()
    write_video(args.out, ((rec[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy(), clip_fps)
    print(f"reconstruction {tuple(rec.shape)} -> {args.out}  PSNR {psnr(rec, x.float().cpu()):.2f} dB  "
          f"SSIM {ssim(rec, x.float().cpu()):.4f}")
    return 0
