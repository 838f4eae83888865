"""Run the job: plan before Ray starts, stream the shards through Ray Data, commit shard by shard.

    shards -> map_batches(ingest_shards)          CPU tasks, streaming, one shard per task
           -> map_batches(EncodeUnits, actors)    one actor per GPU (or CPU actors), batch_size 1 (a unit)
           -> driver: small records per shard; commit when complete (job/driver.py)
"""
import contextlib
import copy
import dataclasses
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import ray
import yaml

from encoder_service import metrics
from encoder_service.encode.unit_encoder import UNITS_IN_FLIGHT
from encoder_service.ingest.clips import IngestConfig
from encoder_service.ingest.stage import ingest_shards
from encoder_service.ingest.units import MAX_UNIT_FRAME_BYTES, UnitPlan
from encoder_service.job import faults
from encoder_service.job.config import JobConfig, to_json
from encoder_service.job.console import without_false_alarms
from encoder_service.job.driver import Driver, Totals
from encoder_service.job.plan import JobError, Plan, prepare
from encoder_service.job.progress import Progress, planning_heartbeat
from encoder_service.job.stages import EncoderSpec, EncodeUnits
from encoder_service.job.stop import Interrupted, StopSignals
from encoder_service.job.summary import folder_after_run, write_records
from encoder_service.model.wfvae import resolve_checkpoint
from encoder_service.records import RunRecord, StageRow, from_table
from encoder_service.storage import scrub


class JobFailed(Exception):
    """The run could not finish (e.g. no encoder actor could start): one line, exit 1."""


def build_dataset(cfg: JobConfig, plan: Plan, registry):
    from ray.data import ActorPoolStrategy
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress (job/progress.py) counts clips, not blocks
    ctx.target_max_block_size = MAX_UNIT_FRAME_BYTES + (64 << 20)  # a unit is one row: never split, rarely merged
    storage = cfg.storage()
    ingest = IngestConfig(cfg.sampling(), cfg.decoder, storage, threads=max(1, round(cfg.ingest_cpus)))
    ds = ray.data.from_items([{"url": u, "shard_id": s} for u, s in plan.todo],
                             override_num_blocks=max(1, len(plan.todo)))
    ds = ds.map_batches(ingest_shards, fn_kwargs={"cfg": ingest, "units": UnitPlan.for_job(cfg, plan.model.latent_dim)},
                        batch_size=1, batch_format="pyarrow", num_cpus=cfg.ingest_cpus,
                        label_selector=dict(cfg.ingest_labels) or None)
    spec = EncoderSpec(cfg, plan.run_meta)
    # Ray Data restarts dead pool actors and retries their calls (max_restarts=-1, max_task_retries=-1);
    # job/faults.py bounds the retries of a unit that keeps failing.
    # UNITS_IN_FLIGHT calls per actor at once, each in its own thread (encode/unit_encoder.py)
    pool = ActorPoolStrategy(size=cfg.actors(), max_tasks_in_flight_per_actor=UNITS_IN_FLIGHT,
                             max_concurrent_calls_per_actor=UNITS_IN_FLIGHT, enable_true_multi_threading=True)
    return ds.map_batches(EncodeUnits, fn_constructor_args=(spec, registry), batch_size=1, batch_format="pyarrow",
                          compute=pool, runtime_env=faults.env_for_workers() or None,
                          **encoder_resources(cfg, plan))


def encoder_resources(cfg: JobConfig, plan: Plan) -> dict:
    """What one encoder actor asks Ray for. A CPU encoder also reserves memory for its model: that is
    what a CPU encoder needs, and resources unlike ingest's keep Ray Data from fusing ingest into the
    encoder actors, so ingest spreads over every CPU while the encoder pool stays fixed."""
    placement = {"label_selector": dict(cfg.encoder_labels)} if cfg.encoder_labels else {}
    if cfg.num_gpus > 0:
        return {"num_gpus": 1, "num_cpus": cfg.encoder_cpus, **placement}
    weights = Path(resolve_checkpoint(Path(cfg.checkpoint), cfg.model_config)[0]).stat().st_size
    return {"num_gpus": 0, "num_cpus": cfg.encoder_cpus, "memory": 2 * weights + (512 << 20), **placement}


def run_job(cfg: JobConfig) -> dict:
    """Plan (JobError before Ray), run, write the folder summary; the outcome is counted in
    `wfvae_job_runs_total`, then the driver lingers so Ray's metrics agent exports the last values.
    SIGTERM/SIGINT stop the run cleanly (job/stop.py) from the first moment: during planning or
    Ray's start-up nothing has begun and Interrupted is raised at once; later the record says
    "interrupted", then Interrupted is raised. Ray is stopped at the end if this call started it."""
    started = time.time()  # the job's start: clips/s are end to end, start-up included
    plan, outcome, logging_config, started_ray = None, "failed", None, False
    stop = StopSignals(cfg.stop_grace_s, at_once=lambda: plan is not None and plan.lease.release())
    console = contextlib.ExitStack()
    try:
        with stop:
            with stop.waiting(), sigterm_from_ray():  # start-up: a signal stops here, before any work
                with planning_heartbeat(cfg):
                    plan = prepare(cfg)
                print(plan.line(), flush=True)
                if not ray.is_initialized():
                    started_ray = True  # (set first: a signal inside ray.init still shuts down what it began)
                    ray.init(address=cfg.ray_address, ignore_reinit_error=True, log_to_driver=True,
                             logging_level="ERROR")
                console.enter_context(without_false_alarms())
                logging_config = _quiet_ray_data_console()
                stop.install()  # ray.init installs a SIGTERM handler of its own: ours again for the run
            stop.check()    # a signal some library swallowed during start-up still stops the run
            record = _run(resolve_gpus(cfg), plan, stop, started)
        outcome = "interrupted" if record["interrupted"] else "failed" if record["shards_failed"] else "succeeded"
        if record["interrupted"]:
            raise Interrupted(stop.signum)
        return record
    finally:
        if plan is not None:
            plan.lease.release()
        if logging_config is not None:  # (the file stays: the next run reuses it)
            os.environ.pop("RAY_DATA_LOGGING_CONFIG", None)
        if ray.is_initialized():
            metrics.inc("wfvae_job_runs", outcome=outcome)
            time.sleep(0 if outcome == "interrupted" or plan is None else cfg.metrics_linger_s)
        if started_ray:
            ray.shutdown()
        console.close()


@contextlib.contextmanager
def sigterm_from_ray():
    """ray.init installs, first thing, a SIGTERM handler that raises SystemExit(15); a SIGTERM from
    then until ours is back is the same clean stop as any other (exit 143, not 15)."""
    try:
        yield
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        print("[stop] SIGTERM during Ray's start-up: stopping before any work", file=sys.stderr, flush=True)
        raise Interrupted(signal.SIGTERM) from None


def resolve_gpus(cfg: JobConfig) -> JobConfig:
    """--num-gpus as given, or (not given) the GPUs the cluster has, or will have when its
    autoscaler can add GPU nodes; none means CPU encoding, said in one line. An explicit number
    beyond what the cluster has and its autoscaler can reach is a JobError (exit 2) in seconds."""
    gpus, reachable = int(ray.cluster_resources().get("GPU", 0)), autoscaler_max_gpus()
    if cfg.num_gpus is None:
        if not gpus and reachable:
            gpus = reachable if reachable < sys.maxsize else 1  # an unbounded group: one; --num-gpus N for more
            print(f"[plan] no GPU yet; the autoscaler can add {reachable if reachable < sys.maxsize else 'more'}: "
                  f"encoding on {gpus} GPU(s) as they come (--num-gpus N for another number)", flush=True)
        else:
            print(f"[plan] encoding on the cluster's {gpus} GPU(s)" if gpus else "[plan] the cluster has no GPU "
                  "and no autoscaler that adds any: encoding on the CPU", flush=True)
        return dataclasses.replace(cfg, num_gpus=gpus)
    if cfg.num_gpus > max(gpus, reachable or 0):
        raise JobError(f"--num-gpus {cfg.num_gpus}: the cluster has {gpus} GPU(s) and "
                       f"{'its autoscaler can reach ' + str(reachable) if reachable else 'no autoscaler to add any'}; "
                       f"pass --num-gpus {gpus} (or leave it out{', or 0 to encode on the CPU' if not gpus else ''})")
    if cfg.num_gpus > gpus:
        print(f"[plan] --num-gpus {cfg.num_gpus}, the cluster has {gpus} GPU(s) now: encoder actors wait for the "
              "autoscaler to add the rest", file=sys.stderr, flush=True)
    return cfg


def autoscaler_max_gpus() -> int:
    """GPUs the cluster's autoscaler can reach (its node groups' max counts, as Ray Data reads
    them); 0 without an autoscaler (a local or fixed cluster)."""
    try:
        reachable = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - an older or different Ray: as if there were no autoscaler
        return 0
    return int((reachable or {}).get("GPU", 0) or 0)


def _quiet_ray_data_console() -> Path | None:
    """Ray Data's INFO/WARNING lines off the console (they stay in its log files under /tmp/ray):
    our progress lines say what a user watches for. Ray Data re-reads its logging config (its
    documented RAY_DATA_LOGGING_CONFIG) whenever a dataset runs; this is its default with the
    console handler at ERROR. A user's own config wins."""
    if "RAY_DATA_LOGGING_CONFIG" in os.environ:
        return None
    try:
        from ray.data._internal.logging import DEFAULT_CONFIG
    except ImportError:
        return None
    config = copy.deepcopy(DEFAULT_CONFIG)
    config.get("handlers", {}).get("console", {})["level"] = "ERROR"
    # one file per user, the same bytes every run: reused, never one left behind per (killed) run
    path = Path(tempfile.gettempdir()) / f"wfvae-ray-data-logging-{os.getuid()}.yaml"
    text = yaml.safe_dump(config)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(path)
    from ray.data._internal.logging import configure_logging
    configure_logging()
    return path


def _run(cfg: JobConfig, plan: Plan, stop: StopSignals, started: float) -> dict:
    progress = Progress(len(plan.todo), cfg.progress_every_s)
    driver = Driver(plan, progress.update, cfg.commit_group_shards, cfg.commit_group_s)
    metrics.inc("wfvae_shards", plan.skipped, status="skipped")
    metrics.set_gauge("wfvae_job_shards_planned", len(plan.todo))
    interrupted = None
    try:
        if plan.todo:
            with progress.heartbeat(lambda: (driver.tick(), driver.totals)[1]):
                _consume(build_dataset(cfg, plan, faults.make_registry()), driver, stop)
    except Interrupted as exc:
        interrupted = exc
    finally:
        driver.close()  # the finished shards are committed (or the grace period ends the process)
    ended = time.time()  # the last commit: the rates end here, before the tables are checkpointed
    failed = {**driver.totals.failed, **({} if interrupted else driver.unfinished())}
    progress.close(driver.totals)
    folder = folder_after_run(plan, driver.totals.committed, driver.committed)
    record = _run_record(cfg, plan, driver.totals, failed, (started, ended), quality=driver.quality(),
                         interrupted=interrupted is not None,
                         shards_left_for_next_run=len(plan.todo) - driver.totals.committed.shards - len(failed),
                         table=_finish_table(plan, cfg, interrupted is None))
    write_records(plan.folder, folder, record)
    plan.folder.remove_temporaries()
    print("[summary] " + scrub(json.dumps({k: record[k] for k in ("shards_done", "shards_skipped", "shards_failed",
                                                                   "clips", "latents", "errors", "clips_per_s")})),
          flush=True)
    _print_quality(record["quality"])
    for shard_id, reason in sorted(failed.items()):
        print(f"[failed] {shard_id}: {reason}", file=sys.stderr, flush=True)
    return record


def _finish_table(plan: Plan, cfg: JobConfig, vacuum: bool) -> dict:
    """Checkpoint and vacuum the folder's tables (not after a stop: the grace period is for commits)."""
    out = {"latents_version": plan.latents.version()}
    if vacuum:
        out.update(plan.folder.finish(cfg.vacuum_retention_hours))
    return out


def _print_quality(quality: dict) -> None:
    drift = quality["drift"]["mean"]
    if drift["history"]:
        print(f"[quality] latent means moved {drift['mean_shift_ratio']:.3f} historical std (bound "
              f"{quality['drift_bounds']['mean_shift_ratio']}), std ratio {drift['std_ratio']:.3f} (bound "
              f"{quality['drift_bounds']['std_ratio']}){': DRIFT' if drift['alert'] else ''}", flush=True)
    if quality["qa"]:
        q = quality["qa"]
        print(f"[quality] {q['clips']} QA clips: drift vs fp32 mean {q['drift_mean']['mean']:.2e} max "
              f"{q['drift_mean']['max']:.2e}; reconstruction PSNR {q['psnr_db']:.2f} dB SSIM {q['ssim']:.4f} "
              "(meaningful for trained weights only)", flush=True)


def _consume(ds, driver: Driver, stop: StopSignals) -> None:
    """Rows into the driver until the stream ends; a stop signal ends it only while waiting for
    the next batch (stop.waiting), never in the middle of a row."""
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        while True:
            with stop.waiting():
                batch = next(batches, None)
            if batch is None:
                return
            driver.totals.driver_bytes += batch.nbytes
            for row in from_table(batch, StageRow):
                driver.add(row)
    except ray.exceptions.RayError as exc:
        raise JobFailed(_root_cause(exc)) from exc
    finally:
        getattr(batches, "close", lambda: None)()  # a stopped run: Ray Data's executor shuts down


def _root_cause(exc: BaseException) -> str:
    """The user-level error Ray wrapped (e.g. why an encoder actor could not start), one line."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        lines = [f"{m.group(2)}: {m.group(3)}" for m in _ERROR_LINE.finditer(str(exc))
                 if not m.group(2).startswith(("Ray", "System"))]
        found = lines[-1] if lines else found
        exc = exc.__cause__ or getattr(exc, "cause", None) or exc.__context__
    return scrub(found or "the Ray Data execution failed (see the Ray logs)")


# "CheckpointError: ..." or, as Ray prints exceptions of user code, "encoder_service.x.CheckpointError: ..."
_ERROR_LINE = re.compile(r"(?m)^\s*((?:\w+\.)*)(\w+(?:Error|Exception)): (\S.*)$")


def _run_record(cfg: JobConfig, plan: Plan, t: Totals, failed: dict, span: tuple[float, float], **end) -> dict:
    """clips_per_s counts from the job's start (planning and Ray's start-up included: what a night
    costs); clips_per_s_encoding from the first model call of any unit (the rate once encoding runs,
    what --dry-run projects); startup_seconds is the time between. span: (the job's start, its last
    commit)."""
    started, now = span
    elapsed = now - started
    first = t.first_encode or t.first_result
    done = t.committed
    rates = {"clips_per_s": round(done.latents / elapsed, 3) if elapsed else 0.0,
             "clips_per_s_encoding": round(done.latents / (now - first), 3) if first and now > first else None,
             "startup_seconds": round(first - started, 2) if first else None}
    busy = None
    if first is not None:
        busy = round(min(1.0, t.encode_seconds / (cfg.actors() * max(1e-9, now - first))), 3)
    return dataclasses.asdict(RunRecord(
        inputs=plan.inputs, shards_done=done.shards, shards_skipped=plan.skipped,
        shards_by_reason=dict(sorted(plan.why.items())), shards_failed=len(failed),
        failed_shards=dict(sorted(failed.items())), clips=done.clips, latents=done.latents,
        errors=sum(done.ledger_reasons.values()), errors_by_reason=dict(sorted(done.ledger_reasons.items())),
        seconds=round(elapsed, 2), **rates, encoder_busy_fraction=busy, compile_seconds=round(t.compile_seconds, 2),
        text_seconds_per_clip=(round(t.text_seconds / done.latents, 5) if cfg.text_encoder and done.latents
                               else None),
        captions_missing=t.captions_missing, driver_bytes_received=t.driver_bytes, settings=plan.settings,
        run=dataclasses.asdict(plan.run_meta), config=to_json(cfg), **end))


__all__ = ["JobFailed", "run_job"]
