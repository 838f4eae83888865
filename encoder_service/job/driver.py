"""The driver's part: gather the small records per shard and commit each shard once all of it is in.

The driver sees UnitResults (a data file's name, rows, bytes, checksum, statistics, ledger rows)
and ShardEnds, never latents: per in-flight shard it holds one record per unit, a few hundred
bytes plus its ledger rows. Records are keyed by (shard, unit), so a unit retried by Ray (after a
lost node or actor) cannot be counted twice. A shard is committed when its end row and all its
units are in and nothing failed; a shard whose input could not be read, or one of whose units
failed for a reason that was not its input, is reported and left uncommitted for the next run.

Commits of different shards run concurrently in a bounded pool (within a shard: data, ledger,
manifest last); what a commit leaves behind is merged here, one O(channels) step per shard, into
the run's totals and the folder index. Nothing is kept per committed shard but its id.
"""
import functools
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from encoder_service import metrics
from encoder_service.job.plan import Plan
from encoder_service.records import DataFile, FolderTotals, Manifest, ShardEnd, ShardStats, StageRow, UnitResult
from encoder_service.shards import totals
from encoder_service.shards.index import IndexWriter
from encoder_service.shards.schema import SCHEMA_VERSION
from encoder_service.shards.writer import Committed, commit_shard, remove_staging
from encoder_service.storage import scrub


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
    """What this invocation did (the folder's totals: records.FolderTotals)."""
    shards_done: int = 0
    clips: int = 0
    latents: int = 0
    ledger: Counter = field(default_factory=Counter)      # "stage/reason" -> rows
    failed: dict = field(default_factory=dict)            # shard id -> reason
    encode_seconds: float = 0.0
    compile_seconds: float = 0.0                          # torch.compile, all actors (--compile)
    first_result: float | None = None
    driver_bytes: int = 0                                 # Arrow bytes the driver received
    clips_encoded: int = 0                                # as units come back, before their shard commits
    shards_ingested: int = 0                              # end rows seen ...
    clips_ingested: int = 0                               # ... and their clips: for the estimated total


class LeaseLost(RuntimeError):
    pass


class Driver:
    def __init__(self, plan: Plan, on_progress=None, commit_threads: int = 16):
        self.plan, self.states, self.totals = plan, {}, Totals()
        self.committed: set[str] = set()
        self.run = FolderTotals()                          # the shards this run committed
        self.on_progress = on_progress or (lambda totals: None)
        self.index = IndexWriter(plan.fs, plan.root, plan.index)
        self.pool = ThreadPoolExecutor(commit_threads, thread_name_prefix="wfvae-commit")
        self.inflight: dict[str, Future] = {}
        self.max_inflight = 2 * commit_threads             # backpressure on the stream of results

    def add(self, row: StageRow) -> None:
        sid = row.shard_id
        if sid in self.committed or sid in self.totals.failed or sid in self.inflight:
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
            t.clips_encoded += row.result.clips - len(row.result.ledger)
            t.first_result = t.first_result or time.time()
        if state.finished():
            self._finish(sid, self.states.pop(sid))
        self._reap(block=False)
        self.on_progress(self.totals)

    def _finish(self, sid: str, state: ShardState) -> None:
        failure = state.failure()
        if failure is None and not self.plan.lease.valid():
            failure = f"the run lost the output folder's lease ({self.plan.lease.lost}): not committed"
        if failure:
            remove_staging(self.plan.fs, self.plan.root, sid)
            self._failed(sid, failure)
            return
        while len(self.inflight) >= self.max_inflight:
            self._reap(block=True)
        ledger = list(state.end.ledger) + [row for i in sorted(state.results) for row in state.results[i].ledger]
        self.inflight[sid] = self.pool.submit(self._commit, self._manifest(sid, state, ledger), state, ledger)

    def _manifest(self, sid: str, state: ShardState, ledger: list) -> Manifest:
        """Everything of the shard's manifest but its files (the commit adds them)."""
        results = [state.results[i] for i in sorted(state.results)]
        reasons = Counter(f"{row.stage}/{row.reason}" for row in ledger)
        stats = functools.reduce(totals.add_shard_stats, (ShardStats(r.mean_stats, r.logvar_stats) for r in results),
                                 ShardStats())
        pending = self.plan.pending[sid]
        return Manifest(SCHEMA_VERSION, sid, self.plan.fingerprint, self.plan.run_meta, scrub(state.end.source_url),
                        pending.input, state.end.clips, sum(r.file.rows for r in results if r.file),
                        dict(sorted(reasons.items())), reasons.get("encode/non_finite_latent", 0), stats,
                        sorted((q for r in results for q in r.qa), key=lambda q: q.key), [], DataFile("", 0, 0, ""))

    def _commit(self, manifest: Manifest, state: ShardState, ledger: list) -> tuple[Committed, float]:
        """In a commit thread: store requests only; the bookkeeping happens in _reap."""
        start = time.perf_counter()
        staged = {i: r.file for i, r in state.results.items() if r.file is not None}
        committed = commit_shard(self.plan.fs, self.plan.root, manifest, staged, ledger,
                                 replaces=self.plan.pending[manifest.shard_id].replaces, guard=self._guard)
        return committed, time.perf_counter() - start

    def _guard(self) -> None:
        """Checked just before a manifest is written: never commit without the folder's lease."""
        if not self.plan.lease.valid():
            raise LeaseLost(f"the run lost the output folder's lease ({self.plan.lease.lost}): not committed")

    def _reap(self, block: bool) -> None:
        if block and self.inflight:
            wait(list(self.inflight.values()), return_when=FIRST_COMPLETED)
        for sid in [s for s, f in self.inflight.items() if f.done()]:
            try:
                committed, seconds = self.inflight.pop(sid).result()
            except Exception as exc:  # noqa: BLE001 - a store that fails after retries: the shard, not the run
                self._failed(sid, scrub(str(exc)) if isinstance(exc, LeaseLost) else
                             scrub(f"commit failed ({type(exc).__name__}: {exc}); the next run redoes it"))
                continue
            self._count(committed, seconds)

    def _failed(self, sid: str, reason: str) -> None:
        self.totals.failed[sid] = reason
        metrics.inc("wfvae_shards", status="failed")

    def _count(self, c: Committed, seconds: float) -> None:
        record = totals.shard_record(c.manifest, c.manifest_bytes, c.manifest_tag)
        self.committed.add(record.shard_id)
        self.index.add(record)
        totals.add_shard(self.run, record)
        t = self.totals
        t.shards_done, t.clips, t.latents = t.shards_done + 1, t.clips + record.clips, t.latents + record.latents
        t.ledger.update(record.ledger_reasons)
        metrics.inc("wfvae_shards", status="done")
        metrics.inc("wfvae_latents_written", record.latents)
        metrics.inc("wfvae_latent_bytes_written", record.file_bytes)
        for key, n in record.ledger_reasons.items():
            stage, reason = key.split("/", 1)
            metrics.inc("wfvae_errors", n, stage=stage, reason=reason)
        metrics.observe("wfvae_write_seconds", seconds)
        self._report_quality()

    def drain(self) -> None:
        """Wait for the commits under way."""
        while self.inflight:
            self._reap(block=True)

    def close(self) -> None:
        """Wait for the commits under way and write the index rows not yet written."""
        self.drain()
        self.pool.shutdown()
        self.index.flush()
        self.on_progress(self.totals)

    def quality(self) -> dict:
        """This run's latent statistics, their drift against the folder's history, and the QA figures."""
        return totals.quality_report(self.run, self.plan.history)

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
