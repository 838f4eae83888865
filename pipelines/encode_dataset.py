"""Encode WebDataset video shards into WF-VAE latent Parquet shards on a Ray cluster.

    ray job submit --working-dir . -- python pipelines/encode_dataset.py \
        --input 's3://bucket/videos/shard-{000000..000999}.tar' --output s3://bucket/latents/wfvae-l \
        --checkpoint /models/WF-VAE-L-16Chn
    python pipelines/encode_dataset.py --demo        # local Ray, generated videos, tiny checkpoint

Argument parsing and wiring only; the logic lives in encoder_service.job.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoder_service.job.config import load_config  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--demo" in argv:
        from encoder_service.job.demo import demo_arguments
        root = Path(__file__).resolve().parents[1] / "demo_output"
        argv = demo_arguments(root) + [a for a in argv if a != "--demo"]
    cfg, _ = load_config(argv)
    if cfg.dry_run:
        from encoder_service.job.dryrun import dry_run
        dry_run(cfg)
        return 0
    from encoder_service.job.run import run_job
    summary = run_job(cfg)
    return 1 if summary["shards_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
