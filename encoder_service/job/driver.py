"""The driver's part: gather the small records per shard, and commit finished shards in groups.

The driver sees UnitResults (a data file's name, rows, bytes, checksum, statistics, ledger rows)
and ShardEnds, never latents: per in-flight shard it holds one record per unit, a few hundred
bytes plus its ledger rows. Records are keyed by (shard, unit), so a unit retried by Ray (after a
lost node or actor) cannot be counted twice. A shard is finished when its end row and all its
units are in; one whose input could not be read, or one of whose units failed for a reason that
was not its input, is reported and left uncommitted for the next run.

Finished shards wait in a group (at most --commit-group-shards, --commit-group-s) and a group is
one commit of the folder's tables (table/folder.py), made by one commit thread while the next group
fills: a commit costs a few requests whatever the group holds, so commits keep up with any number
of encoders. What a commit leaves behind is merged here, O(channels) per shard, into the run's
totals. Nothing is kept per committed shard but its id.
"""
import functools
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from encoder_service import metrics
from encoder_service.job.plan import Plan
from encoder_service.records import FolderTotals, ShardEnd, ShardRecord, ShardStats, StageRow, UnitResult
from encoder_service.storage import scrub
from encoder_service.table import totals
from encoder_service.table.folder import ShardCommit


@dataclass
class ShardState:
    results: dict[int, UnitResult] = field(default_factory=dict)
    end: ShardEnd | None = None

    def finished(self) -> bool:
        return self.end is not None and len(self.results) == self.end.units

    def failure(self) -> str | None:
        return self.end.failure or next((r.failure for r in self.results.values() if r.failure), None)


@dataclass
class Totals:
    """What this invocation did: the shards it committed, counted as the folder counts them (one
    totals type: records.FolderTotals), and the run's own progress and timings."""
    committed: FolderTotals = field(default_factory=FolderTotals)
    failed: dict = field(default_factory=dict)            # shard id -> reason
    encode_seconds: float = 0.0
    compile_seconds: float = 0.0                          # torch.compile, all actors (--compile)
    text_seconds: float = 0.0                             # the text encoder, all actors (--text-encoder)
    captions_missing: int = 0                             # latent rows without a caption
    first_result: float | None = None
    first_encode: float | None = None                     # the earliest unit's first model call (epoch s)
    driver_bytes: int = 0                                 # Arrow bytes the driver received
    clips_encoded: int = 0                                # as units come back, before their shard commits
    shards_ingested: int = 0                              # end rows seen ...
    clips_ingested: int = 0                               # ... and their clips: for the estimated total


class LeaseLost(RuntimeError):
    pass


class Driver:
    def __init__(self, plan: Plan, on_progress=None, group_shards: int = 64, group_s: float = 2.0):
        self.plan, self.states, self.totals = plan, {}, Totals()
        self.committed: set[str] = set()
        self.run_id = uuid.uuid4().hex[:12]
        self.on_progress = on_progress or (lambda totals: None)
        self.group: list[ShardCommit] = []                 # finished shards waiting for their commit
        self.group_since = 0.0
        self.group_shards, self.group_s = group_shards, group_s
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="wfvae-commit")
        self.inflight: tuple[list[ShardCommit], Future] | None = None
        self.lock = threading.RLock()                      # add() and the heartbeat's tick()

    def add(self, row: StageRow) -> None:
        with self.lock:
            self._add(row)
            self._reap(block=False)
            self.tick()
        self.on_progress(self.totals)

    def _add(self, row: StageRow) -> None:
        sid = row.shard_id
        if sid in self.committed or sid in self.totals.failed or sid in self.waiting():
            return  # a late copy (Ray re-ran a task whose output was lost with a node): already final
        state = self.states.setdefault(sid, ShardState())
        t = self.totals
        if row.kind == "end" and state.end is None:
            state.end = row.end
            t.shards_ingested, t.clips_ingested = t.shards_ingested + 1, t.clips_ingested + row.end.clips
        elif row.kind == "result" and row.result.index not in state.results:
            state.results[row.result.index] = row.result
            t.encode_seconds += row.result.encode_seconds
            t.compile_seconds += row.result.compile_seconds
            t.text_seconds += row.result.text_seconds
            t.captions_missing += row.result.captions_missing
            t.clips_encoded += row.result.clips - len(row.result.ledger)
            t.first_result = t.first_result or time.time()
            if row.result.started_at is not None:
                t.first_encode = min(t.first_encode or row.result.started_at, row.result.started_at)
        if state.finished():
            self._finish(sid, self.states.pop(sid))

    def waiting(self) -> set[str]:
        """Shards finished and not yet committed (in the group or in the commit under way)."""
        inflight = self.inflight[0] if self.inflight else []
        return {c.record.shard_id for c in [*self.group, *inflight]}

    def _finish(self, sid: str, state: ShardState) -> None:
        failure = state.failure()
        if failure:
            self._failed(sid, failure)  # its files stay unreferenced: vacuum's, never ours to delete (a
            return                      # file named by its content may be the one the table holds now)
        if not self.group:
            self.group_since = time.monotonic()
        self.group.append(ShardCommit(self._record(sid, state), self.plan.pending[sid].old))

    def _record(self, sid: str, state: ShardState) -> ShardRecord:
        results = [state.results[i] for i in sorted(state.results)]
        ledger = list(state.end.ledger) + [row for r in results for row in r.ledger]
        reasons = Counter(f"{row.stage}/{row.reason}" for row in ledger)
        stats = functools.reduce(totals.add_shard_stats, (ShardStats(r.mean_stats, r.logvar_stats) for r in results),
                                 ShardStats())
        files = [r.file for r in results if r.file is not None]
        qa = sorted((q for r in results for q in r.qa), key=lambda q: q.key)
        return ShardRecord(sid, scrub(state.end.source_url), self.plan.fingerprint, self.plan.pending[sid].input,
                           self.plan.run_meta.vae_sha256, state.end.clips, sum(f.rows for f in files),
                           dict(sorted(reasons.items())), reasons.get("encode/non_finite_latent", 0),
                           sum(f.bytes for f in files), stats,
                           totals.qa_summary(qa), files, ledger, qa)

    def tick(self, force: bool = False) -> None:
        """Commit the group when it is full, old enough, or (force) at the end; one commit at a time."""
        with self.lock:
            due = self.group and (force or len(self.group) >= self.group_shards
                                  or time.monotonic() - self.group_since >= self.group_s)
            if not due:
                return
            if self.inflight is not None:
                if not force and len(self.group) < self.group_shards:
                    return  # the group grows while the commit under way finishes
                self._reap(block=True)
            group, self.group = self.group, []
            self.inflight = (group, self.pool.submit(self._commit, group))

    def _commit(self, group: list[ShardCommit]) -> float:
        """In the commit thread: store requests only; the bookkeeping happens in _reap."""
        start = time.perf_counter()
        if not self.plan.lease.valid():
            raise LeaseLost(f"the run lost the output folder's lease ({self.plan.lease.lost}): not committed")
        self.plan.folder.commit(self.plan.latents, self.plan.shards, group, self.run_id)
        return time.perf_counter() - start

    def _reap(self, block: bool) -> None:
        if self.inflight is None or not (block or self.inflight[1].done()):
            return
        group, future = self.inflight
        self.inflight = None
        try:
            seconds = future.result()
        except Exception as exc:  # noqa: BLE001 - a store that fails after retries: the shards, not the run
            reason = scrub(str(exc)) if isinstance(exc, LeaseLost) else \
                scrub(f"commit failed ({type(exc).__name__}: {exc}); the next run redoes it")
            for c in group:
                self._failed(c.record.shard_id, reason)
            return
        for c in group:
            self._count(c.record, seconds / len(group))

    def _failed(self, sid: str, reason: str) -> None:
        self.totals.failed[sid] = reason
        metrics.inc("wfvae_shards", status="failed")

    def _count(self, record: ShardRecord, seconds: float) -> None:
        self.committed.add(record.shard_id)
        totals.add_shard(self.totals.committed, record)
        metrics.inc("wfvae_shards", status="done")
        metrics.inc("wfvae_latents_written", record.latents)
        metrics.inc("wfvae_latent_bytes_written", record.file_bytes)
        for key, n in record.ledger_reasons.items():
            stage, reason = key.split("/", 1)
            metrics.inc("wfvae_errors", n, stage=stage, reason=reason)
        metrics.observe("wfvae_write_seconds", seconds)
        self._report_quality()

    def drain(self) -> None:
        """Commit what is finished and wait for it."""
        with self.lock:
            self.tick(force=True)
            self._reap(block=True)

    def close(self) -> None:
        """Commit what is finished; the caller prints the final progress line."""
        self.drain()
        self.pool.shutdown()
    def quality(self) -> dict:
        """This run's latent statistics, their drift against the folder's history, and the QA figures."""
        return totals.quality_report(self.totals.committed, self.plan.history)

    def _report_quality(self) -> None:
        """O(channels): the run's statistics are running sums."""
        report = self.quality()
        for kind, stats in report["stats"].items():
            for c, (mean, std) in enumerate(zip(stats["mean"], stats["std"]) if stats else ()):
                metrics.set_gauge("wfvae_latent_channel_mean", mean, tensor=kind, channel=str(c))
                metrics.set_gauge("wfvae_latent_channel_std", std, tensor=kind, channel=str(c))
            metrics.set_gauge("wfvae_latent_mean_shift_ratio", report["drift"][kind]["mean_shift_ratio"], tensor=kind)
            metrics.set_gauge("wfvae_latent_std_ratio", report["drift"][kind]["std_ratio"], tensor=kind)
        if report["qa"]:
            for stat in ("mean", "p99", "max"):
                metrics.set_gauge("wfvae_qa_drift_ratio", report["qa"]["drift_mean"][stat], stat=stat)
            metrics.set_gauge("wfvae_qa_psnr_decibels", report["qa"]["psnr_db"])
            metrics.set_gauge("wfvae_qa_ssim", report["qa"]["ssim"])

    def unfinished(self) -> dict[str, str]:
        """Shards whose rows never all arrived (the stream ended early): failed, uncommitted."""
        return {shard_id: "the run ended before all of the shard's units came back" for shard_id in self.states}


__all__ = ["Driver", "Totals"]
