"""Job options: one dataclass, filled from the command line and/or a YAML/JSON config file."""
import argparse
import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from encoder_service.ingest.sampling import SamplingConfig, parse_bucket

PIPELINE_VERSION = "0.1.0"


@dataclass
class JobConfig:
    input: list[str] = field(default_factory=list)
    output: str = ""
    checkpoint: str = ""
    model_config: str | None = None
    num_frames: int = 33
    size: str = "256x256"
    buckets: list[str] = field(default_factory=list)
    fps: float | None = None
    stride: int = 1
    clips_per_video: str = "first"
    seed: int = 0
    min_duration: float = 0.0
    max_pixels: int = 3840 * 2160
    precision: str = "bf16"
    batch_size: int = 4
    chunk_frames: int | None = 16
    num_gpus: int = 1
    encoder_actors: int | None = None
    ingest_cpus: float = 1.0
    decoder: str = "decord"
    s3_endpoint_url: str | None = None
    overwrite: bool = False
    max_shards: int | None = None
    dry_run: int | None = None
    store_logvar: bool = True
    verify_existing: str = "size"
    ray_address: str | None = None
    progress_every_s: float = 10.0
    metrics_linger_s: float = 12.0
    inject_fault: str | None = None  # test only: "kill-actor-after:N:MARKER_FILE" or "nan:KEY_SUBSTRING"

    def sampling(self) -> SamplingConfig:
        h, w = (int(v) for v in self.size.lower().split("x"))
        return SamplingConfig(num_frames=self.num_frames, fps=self.fps, stride=self.stride,
                              clips=self.clips_per_video, seed=self.seed, min_duration=self.min_duration,
                              size=(h, w), buckets=tuple(parse_bucket(b) for b in self.buckets),
                              max_pixels=self.max_pixels)

    def actors(self) -> int:
        return self.encoder_actors or max(1, self.num_gpus)

    def fingerprint(self) -> str:
        """Hash of everything that changes the latents (not where they go or how fast)."""
        keys = ("checkpoint", "model_config", "num_frames", "size", "buckets", "fps", "stride", "clips_per_video",
                "seed", "min_duration", "max_pixels", "precision", "store_logvar")
        return hashlib.sha256(json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


HELP = {
    "input": "WebDataset shard URLs or patterns (local, s3://, fsspec; brace ranges like shard-{000000..000999}.tar)",
    "output": "output folder for part-*.parquet, errors-*.parquet, manifests and run summaries",
    "checkpoint": "WF-VAE checkpoint folder or weights file",
    "model_config": "model config preset or config.json, if none sits next to the checkpoint",
    "num_frames": "frames per clip, 4k+1", "size": "clip size HxW (multiples of 8)",
    "buckets": "aspect-ratio buckets TxHxW (nearest aspect wins), instead of --num-frames/--size",
    "fps": "resample clips to this frame rate (by timestamp; handles variable frame rate)",
    "stride": "else take every n-th frame", "clips_per_video": "first | all | uniform:N | random:N",
    "seed": "seed for random clip choice", "min_duration": "refuse videos shorter than this (seconds)",
    "max_pixels": "refuse videos with more pixels per frame (checked from the header)",
    "precision": "bf16 | fp32", "batch_size": "clips per encoder call",
    "chunk_frames": "frames per causal-cache chunk inside the encoder (bounds GPU memory)",
    "num_gpus": "GPUs for encoding, one actor each; 0 encodes on CPU",
    "encoder_actors": "encoder actors (default: --num-gpus, or 1 on CPU)",
    "ingest_cpus": "CPUs per ingest task", "decoder": "decord | pyav",
    "s3_endpoint_url": "S3-compatible endpoint for s3:// URLs", "overwrite": "redo shards that are already complete",
    "max_shards": "process at most this many (pending) shards", "dry_run": "encode N clips, report rates and a plan",
    "store_logvar": "store the posterior log-variance too", "verify_existing": "size | checksum: how to check finished shards",
    "ray_address": "Ray cluster address (default: RAY_ADDRESS or a local cluster)",
    "progress_every_s": "seconds between progress lines",
    "metrics_linger_s": "seconds the driver waits at the end so Ray exports the last metric values "
                        "(Ray pushes metrics every 10 s by default)", "inject_fault": argparse.SUPPRESS,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encode_dataset.py", description="Encode WebDataset video shards into "
                                "WF-VAE latent Parquet shards with Ray.")
    p.add_argument("--config-file", help="YAML or JSON file with any of these options (command line wins)")
    p.add_argument("--demo", action="store_true", help="make sample shards and run on them locally (CPU)")
    for f in fields(JobConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool" or isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[f.name])
        elif f.name in ("input", "buckets"):
            p.add_argument(flag, nargs="+", default=None, help=HELP[f.name])
        else:
            p.add_argument(flag, type=_base_type(f.type), default=None, help=HELP[f.name])
    return p


def _base_type(annotation) -> type:
    for kind in (int, float):
        if annotation is kind or kind in typing.get_args(annotation):
            return kind
    return str


def load_config(argv=None) -> tuple[JobConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    values = {}
    if args.config_file:
        text = Path(args.config_file).read_text()
        values = yaml.safe_load(text) or {}
        unknown = set(values) - {f.name for f in fields(JobConfig)}
        if unknown:
            raise SystemExit(f"{args.config_file}: unknown options {sorted(unknown)}")
    values.update({k: v for k, v in vars(args).items() if k in {f.name for f in fields(JobConfig)} and v is not None})
    if isinstance(values.get("input"), str):
        values["input"] = [values["input"]]
    return JobConfig(**values), args


def to_json(cfg: JobConfig) -> dict:
    return asdict(cfg)
