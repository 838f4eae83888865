"""`python -m encoder_service encode|reconstruct VIDEO --checkpoint PATH ...`: one clip through the
model, the way the job would make it (what cli.py loads only for these two commands)."""
import json
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from encoder_service.encode.quality import psnr, ssim
from encoder_service.ingest.decoders import VideoError, get_decoder, probe
from encoder_service.ingest.geometry import plan_geometry
from encoder_service.model import WFVAE, CheckpointError


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


def run(args) -> int:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
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
