"""Encode WebDataset video shards into WF-VAE latent Parquet shards on a Ray cluster.

    ray job submit --working-dir . -- python pipelines/encode_dataset.py \
        --input 's3://bucket/videos/shard-{000000..000999}.tar' --output s3://bucket/latents/wfvae-l \
        --checkpoint /models/WF-VAE-L-16Chn
    python pipelines/encode_dataset.py --demo        # local Ray, generated videos, tiny checkpoint

Argument parsing and wiring only; the logic lives in encoder_service.job.
Exit status: 0 done, 1 some shards failed (retried by the next run) or the run could not finish,
2 a mistake in the options or paths (found before Ray starts), 143 / 130 stopped by SIGTERM /
SIGINT (the commits under way finished; the next run does the rest).
"""
import sys
from pathlib import Path

from encoder_service.ingest.inputs import InputError
from encoder_service.job.config import load_config
from encoder_service.job.plan import JobError
from encoder_service.storage import scrub

DEMO_OUTPUT = Path(__file__).resolve().parents[1] / "demo_output"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--demo" in argv:
        from encoder_service.job.demo import demo_arguments
        argv = demo_arguments(DEMO_OUTPUT) + [a for a in argv if a != "--demo"]
    cfg = load_config(argv)
    try:
        if cfg.dry_run:
            from encoder_service.job.dryrun import dry_run
            dry_run(cfg)
            return 0
        from encoder_service.job.run import JobFailed, run_job
        from encoder_service.job.stop import Interrupted
        try:
            record = run_job(cfg)
        except JobFailed as exc:
            print(f"encode_dataset.py: the run failed: {exc}", file=sys.stderr)
            return 1
        except Interrupted as exc:
            print(f"encode_dataset.py: {exc}: the commits under way finished; the next run does the rest",
                  file=sys.stderr)
            return exc.exit_code
    except (JobError, InputError) as exc:
        print(scrub(f"encode_dataset.py: error: {exc}"), file=sys.stderr)
        return 2
    return 1 if record["shards_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
