"""Command line: `python -m encoder_service reconstruct|encode VIDEO --checkpoint PATH ...`,
`python -m encoder_service inspect OUTPUT` and `python -m encoder_service pack SRC OUT` (also
installed as `wfvae`). Only `encode` and `reconstruct` load torch and the model
(encoder_service/clip_commands.py)."""
import argparse
import json
import os
import sys

from encoder_service import options, pack
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
        s.add_argument("--device", choices=options.DEVICES, default="auto", help="auto: cuda when there is one")
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        return inspect_command(args)
    if args.command == "pack":
        return pack.run(args)
    if args.command == "migrate":
        return migrate.run(args)
    from encoder_service.clip_commands import run  # the model and torch, for these two commands only
    return run(args)
