"""Job options: one dataclass; each field carries its help text and its parser (encoder_service.options),
and the command line and the YAML/JSON config file are both read through them. A value that does
not parse is an argparse usage error: exit 2, one line, before anything starts."""
import argparse
import hashlib
import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import yaml

from encoder_service import options
from encoder_service.ingest.decoders import SWS_FLAGS
from encoder_service.ingest.sampling import SamplingConfig
from encoder_service.storage import StorageOptions, scrub

PIPELINE_VERSION = "0.3.0"


def _number(kind, lo=None, hi=None, what="value"):
    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise options.OptionError(f"{what} must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise options.OptionError(f"{what} must be a finite number, got {text!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise options.OptionError(f"{what} must be in [{lo}, {hi}], got {text!r}")
        return value
    parse.__name__ = what
    return parse


def option(default, help, parse=None, many=False):
    """A job option: default, help text, parser of one (command-line or config-file) value."""
    kwargs = {"default_factory": list} if default is list else {"default": default}
    return field(**kwargs, metadata={"help": help, "parse": parse, "many": many})


@dataclass
class JobConfig:
    input: list[str] = option(list, "WebDataset shards (.tar, .tar.gz, .tgz; local, s3://, fsspec; brace ranges "
                              "like shard-{000000..000999}.tar). A sample's json/txt members are kept up to 1 MiB "
                              "each (a larger caption is noted and ignored)", str, many=True)
    output: str = option("", "output folder: a Delta Lake table of latents (local or s3://)", str)
    checkpoint: str = option("", "WF-VAE checkpoint folder or weights file", str)
    model_config: str | None = option(None, "model config preset or config.json, if none sits next to the "
                                      "checkpoint", str)
    num_frames: int = option(33, "frames per clip, 4k+1", options.frames)
    size: tuple[int, int] = option((256, 256), "clip size HxW (multiples of 8)", options.size)
    buckets: list[tuple[int, int, int]] = option(list, "aspect-ratio buckets TxHxW (nearest aspect wins), "
                                                 "instead of --num-frames/--size", options.bucket, many=True)
    fps: float | None = option(None, "resample clips to this frame rate (by timestamp; handles variable frame "
                               "rate)", _number(float, 1e-3, 1000, "fps"))
    stride: int = option(1, "else take every n-th frame", _number(int, 1, 1000, "stride"))
    clips_per_video: options.ClipMode = option(options.ClipMode("first"), "first | all | uniform:N | random:N | "
                                               "spans (one clip per [start, end] span in the sample's JSON, see "
                                               "--spans-field)", options.clip_mode)
    spans_field: str = option("clips", "with --clips-per-video spans: the JSON key of the spans, [[start, end], "
                              "...] in seconds or \"H:MM:SS.mmm\" (Panda-70M: timestamp)", str)
    captions_field: str | None = option(None, "with --clips-per-video spans: the JSON key of one caption per span "
                                        "(Panda-70M: caption); stored in each latent row", str)
    seed: int = option(0, "seed for random clip choice", _number(int, 0, 2 ** 63, "seed"))
    min_duration: float = option(0.0, "refuse videos shorter than this (seconds)",
                                 _number(float, 0, 1e6, "min duration"))
    max_pixels: int = option(3840 * 2160, "refuse videos with more pixels per frame (header and every decoded "
                             "frame)", _number(int, 64, 2 ** 31, "max pixels"))
    decoder: str = option("pyav", "pyav | decord (both give the same pixels)",
                          options.choice(options.DECODERS, "decoder"))
    precision: options.Precision = option(options.PRECISIONS["bf16"], "bf16 | fp32 (TF32 off) | tf32",
                                          options.precision)
    store_logvar: bool = option(True, "store the posterior log-variance too")
    batch_size: int = option(4, "clips per encoder call", _number(int, 1, 1024, "batch size"))
    chunk_frames: int | str | None = option("auto", "frames per causal-cache chunk inside the encoder (bounds GPU "
                                            "memory): a multiple of 4, none (whole clips), or auto: whole clips "
                                            "where they fit in half the free GPU memory (the fewest kernel "
                                            "launches), else the largest multiple of 4 that fits",
                                            options.chunk_frames)
    compile: bool = option(False, "compile the encoder with torch.compile (static shapes, one graph; each bucket "
                           "shape compiles once, on its first batch). Off until measured on a GPU")
    cuda_graphs: bool = option(False, "replay each whole-clip batch, or each steady causal-cache chunk, as one CUDA "
                               "graph (one launch instead of hundreds; not with --compile). Off until measured "
                               "on a GPU")
    file_mb: float = option(32.0, "MiB of latents per data file; a file is what one encoder call writes, so "
                            "its clips' frames (about 11x that in bf16) travel as one block",
                            _number(float, 0.001, 4096, "file MiB"))
    num_gpus: int | None = option(None, "GPUs for encoding, one encoder actor each; 0 encodes on CPU actors; "
                                  "by default every GPU the cluster has, or the CPU on a cluster without one",
                                  _number(int, 0, 4096, "num gpus"))
    device: str = option("auto", "auto: CUDA when the actor holds a GPU, cpu: encode on the CPU whatever the "
                         "actor holds (tests, debugging), cuda: require CUDA",
                         options.choice(options.DEVICES, "device"))
    encoder_actors: int | None = option(None, "encoder actors (default: --num-gpus, or 1 on CPU)",
                                        _number(int, 1, 4096, "encoder actors"))
    encoder_cpus: float = option(1.0, "CPUs per encoder actor (its torch threads when encoding on CPU)",
                                 _number(float, 0.1, 256, "encoder cpus"))
    ingest_cpus: float = option(1.0, "CPUs per ingest task (one shard each; decoder threads = this, rounded)",
                                _number(float, 0.1, 64, "ingest cpus"))
    ingest_labels: list[tuple[str, str]] = option(list, "Ray node labels ingest tasks must run on, key=value "
                                                  "(e.g. wfvae-role=ingest for CPU-only nodes)", options.label,
                                                  many=True)
    encoder_labels: list[tuple[str, str]] = option(list, "Ray node labels encoder actors must run on, key=value",
                                                   options.label, many=True)
    s3_endpoint_url: str | None = option(None, "S3-compatible endpoint for s3:// URLs", str)
    store_connect_timeout_s: float = option(10.0, "seconds to connect to the object store, per request",
                                            _number(float, 0.1, 3600, "connect timeout"))
    store_read_timeout_s: float = option(60.0, "seconds to wait for an answer of the object store, per request",
                                         _number(float, 0.1, 3600, "read timeout"))
    store_attempts: int = option(5, "tries per object store request (with backoff) before it counts as failed",
                                 _number(int, 1, 100, "store attempts"))
    overwrite: bool = option(False, "redo every shard, and let the folder take these settings")
    redo_shards: list[str] = option(list, "shard ids (as `inspect` lists them) to encode again though committed: "
                                    "their new files replace the old ones in one commit", str, many=True)
    max_shards: int | None = option(None, "process at most this many (pending) shards",
                                    _number(int, 1, 2 ** 31, "max shards"))
    dry_run: int | None = option(None, "encode N clips here, report rates and what to provision",
                                 _number(int, 1, 100000, "dry run clips"))
    verify_existing: str = option("none", "none | size | checksum: re-check the files of finished shards (size: "
                                  "a HEAD per file, checksum: every byte); none trusts the table's records",
                                  options.choice(options.VERIFY, "verify"))
    input_identity: str = option("store", "store | sha256: how a changed input shard is told; store: its size and "
                                 "ETag (S3) or mtime (local) from the listing; sha256: its content's hash (reads "
                                 "every input once more while planning, so a rewrite with the same size and "
                                 "mtime is seen)",
                                 options.choice(options.INPUT_IDENTITY, "input identity"))
    lease_ttl_s: float = option(600.0, "seconds after its last renewal (every ttl/4) that a run's lease on the "
                                "output folder expires if its holder died; the next run then takes over",
                                _number(float, 1, 86400, "lease ttl"))
    break_lease: int | None = option(None, "take over the output folder's lease of this generation even if it looks "
                                     "live (the number a refusal names): for a run that is gone",
                                     _number(int, 1, 2 ** 62, "lease generation"))
    commit_group_shards: int = option(64, "finished shards committed together in one Delta commit at most",
                                      _number(int, 1, 100000, "commit group shards"))
    commit_group_s: float = option(2.0, "seconds a finished shard waits for others to share its commit at most",
                                   _number(float, 0, 3600, "commit group seconds"))
    vacuum_retention_hours: int = option(168, "at the end of a run, data files no current table version "
                                           "references are deleted once older than this (readers pinned to older "
                                           "versions need their files: keep it above your longest training run)",
                                           _number(int, 0, 10 ** 6, "vacuum retention hours"))
    text_encoder: str | None = option(None, "a T5/mT5/UMT5 encoder folder (Hugging Face layout: config.json, "
                                      "safetensors weights, tokenizer files; local): each latent row also gets its "
                                      "caption's text embedding", str)
    text_max_length: int | None = option(None, "tokens per caption at most (longer ones are truncated and noted); "
                                         "default: the tokenizer's model_max_length, else 512",
                                         _number(int, 1, 65536, "text max length"))
    text_precision: str = option("auto", "auto | bf16 | fp32: the text encoder's dtype and the stored embeddings' "
                                 "(auto: bf16 on CUDA, fp32 on the CPU)",
                                 options.choice(("auto", "bf16", "fp32"), "text precision"))
    qa_fraction: float = option(0.002, "fraction of clips re-encoded in fp32 and decoded for the quality report",
                                _number(float, 0, 1, "qa fraction"))
    ray_address: str | None = option(None, "Ray cluster address (default: RAY_ADDRESS or a local cluster)", str)
    stop_grace_s: float = option(30.0, "on SIGTERM/SIGINT: seconds to finish the commits under way before "
                                 "stopping at once (the pod's termination grace must cover it)",
                                 _number(float, 0, 3600, "stop grace seconds"))
    progress_every_s: float = option(10.0, "seconds between progress lines (without a terminal)",
                                     _number(float, 0.1, 86400, "progress interval"))
    metrics_linger_s: float = option(12.0, "seconds the driver waits at the end so Ray exports the last metric "
                                     "values (Ray pushes metrics every 10 s)", _number(float, 0, 600, "linger"))

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(num_frames=self.num_frames, fps=self.fps, stride=self.stride,
                              clips=self.clips_per_video, seed=self.seed, min_duration=self.min_duration,
                              size=self.size, buckets=tuple(self.buckets), max_pixels=self.max_pixels,
                              spans_field=self.spans_field, captions_field=self.captions_field)

    def storage(self) -> StorageOptions:
        return StorageOptions(endpoint_url=self.s3_endpoint_url, connect_timeout_s=self.store_connect_timeout_s,
                              read_timeout_s=self.store_read_timeout_s, attempts=self.store_attempts)

    def actors(self) -> int:
        return self.encoder_actors or max(1, self.num_gpus or 0)

    def latent_settings(self, checkpoint_sha256: str, model: dict, text_sha256: str | None = None) -> dict:
        """Everything that changes the latents and their text embeddings (not where they go or how fast)."""
        return {"checkpoint_sha256": checkpoint_sha256, "model": model, "num_frames": self.num_frames,
                "size": options.format_dims(self.size), "buckets": [options.format_dims(b) for b in self.buckets],
                "fps": self.fps, "stride": self.stride, "clips_per_video": str(self.clips_per_video),
                **({"spans_field": self.spans_field, "captions_field": self.captions_field}
                   if self.clips_per_video.kind == "spans" else {}),
                "seed": self.seed, "min_duration": self.min_duration, "max_pixels": self.max_pixels,
                "decoder": self.decoder, "pixels": f"swscale {SWS_FLAGS} rgb24", "precision": self.precision.label,
                "store_logvar": self.store_logvar,
                **({"text_encoder": {"sha256": text_sha256, "max_length": self.text_max_length,
                                     "precision": self.text_precision}} if self.text_encoder else {})}


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def to_json(cfg: JobConfig) -> dict:
    """The options as the config file spells them."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("size",):
            value = options.format_dims(value)
        elif f.name == "buckets":
            value = [options.format_dims(b) for b in value]
        elif f.name.endswith("_labels"):
            value = [f"{k}={v}" for k, v in value]
        elif isinstance(value, options.ClipMode):
            value = str(value)
        elif isinstance(value, options.Precision):
            value = value.name
        out[f.name] = value
    return out


def _is_flag(f) -> bool:
    return f.metadata["parse"] is None


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the usage text is --help's), credentials in URLs scrubbed."""

    def error(self, message):
        self.exit(2, scrub(f"{self.prog}: error: {message} (see --help)\n"))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="encode_dataset.py", description="Encode WebDataset video shards into WF-VAE latents (a Delta "
                "Lake table) with Ray.")
    p.add_argument("--config-file", help="YAML or JSON file with any of these options (command line wins)")
    p.add_argument("--demo", action="store_true", help="make sample shards and run on them locally (CPU)")
    for f in fields(JobConfig):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f"{meta['help']} (default: {_shown(default)})"
        if _is_flag(f):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, type=meta["parse"], nargs="+" if meta["many"] else None, default=None, help=help_text)
    return p


def _shown(value) -> str:
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return options.format_dims(value)
    if isinstance(value, options.Precision):
        return value.name
    return str(value) if value not in ([], None) else "none"


def load_config(argv=None) -> JobConfig:
    """Options from the command line over the config file; argparse exits 2 on any bad value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {}
    if args.config_file:
        values = _read_config_file(parser, args.config_file)
    values.update({k: v for k, v in vars(args).items() if k in _names() and v is not None})
    cfg = JobConfig(**values)
    if cfg.captions_field and cfg.clips_per_video.kind != "spans":
        parser.error("--captions-field gives each span its caption: it needs --clips-per-video spans (a sample's "
                     "own caption, its txt or JSON caption, is kept in every row's metadata without it)")
    if cfg.compile and cfg.cuda_graphs:
        parser.error("--compile and --cuda-graphs are one or the other: choose one to measure against eager")
    return cfg


def _names() -> set[str]:
    return {f.name for f in fields(JobConfig)}


def _read_config_file(parser: argparse.ArgumentParser, path: str) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"--config-file {path}: {' '.join(str(exc).split())}")
    if not isinstance(raw, dict):
        parser.error(f"--config-file {path}: expected a mapping of option names to values")
    unknown = sorted(set(raw) - _names())
    if unknown:
        parser.error(f"--config-file {path}: unknown options {unknown}")
    by_name, values = {f.name: f for f in fields(JobConfig)}, {}
    for name, value in raw.items():
        f = by_name[name]
        try:
            values[name] = _parse_value(f, value)
        except options.OptionError as exc:
            parser.error(f"--config-file {path}: {name}: {exc}")
    return values


def _parse_value(f, value):
    parse = f.metadata["parse"]
    if parse is None:
        if not isinstance(value, bool):
            raise options.OptionError(f"must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    if f.metadata["many"]:
        return [parse(v) for v in (value if isinstance(value, list) else [value])]
    return parse(value)


__all__ = ["JobConfig", "PIPELINE_VERSION", "build_parser", "fingerprint", "load_config", "to_json"]
