"""--dry-run's projection beside the rate a run then measures, on this machine.

Demo settings (the bundled checkpoint, 17x64x64 clips, QA on half of them) on 8 demo shards of 8
videos (112 clips). Each repeat runs `--dry-run 112`, then the job itself into a fresh folder (Ray
started once, local); the figure compared is the dry run's "this machine" rate against the run
record's clips_per_s_encoding (from the first model call to the last commit). Target: within
±15 %. CPU figures.

    python -m benchmarks.bench_dryrun            # writes results/dryrun_cpu.json
"""
import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import environment, write_json


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--videos-per-shard", type=int, default=8)
    args = p.parse_args(argv)
    import ray

    from encoder_service.job.config import load_config
    from encoder_service.job.demo import demo_arguments, make_demo_shards
    from encoder_service.job.dryrun import dry_run
    from encoder_service.job.run import run_job
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pattern = make_demo_shards(Path(tmp) / "input", args.shards, args.videos_per_shard)
        for r in range(args.repeats):
            cli = demo_arguments(Path(tmp) / f"run{r}")
            cli[cli.index("--input") + 1] = pattern
            report = dry_run(load_config([*cli, "--dry-run", "100000"]))  # all the input's clips
            record = run_job(load_config(cli))
            rows.append({"dry_run_clips_per_s": round(report["projected_clips_per_s_here"], 2),
                         "bound": report["bound_here"], "run_clips_per_s_encoding": record["clips_per_s_encoding"],
                         "startup_seconds": record["startup_seconds"], "clips": record["latents"],
                         "ratio": round(report["projected_clips_per_s_here"] / record["clips_per_s_encoding"], 3)})
            print(rows[-1], flush=True)
    ray.shutdown()
    ratios = [row["ratio"] for row in rows]
    out = {"environment": environment("cpu"), "settings": "demo (17x64x64, bundled checkpoint, --qa-fraction 0.5)",
           "repeats": rows, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
           "ratio_max": max(ratios), "within_15_percent": sum(0.85 <= x <= 1.15 for x in ratios)}
    print(f"dry run / run: median {out['ratio_median']:.3f}, {min(ratios):.3f}-{max(ratios):.3f}; "
          f"{out['within_15_percent']} of {len(ratios)} within ±15 % -> {write_json('dryrun_cpu', out)}")
    return out


if __name__ == "__main__":
    main()
