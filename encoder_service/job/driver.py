"""The driver's part: gather the small records per shard and commit each shard once all of it is in.

The driver sees UnitResults (a data file's name, rows, bytes, checksum, statistics, ledger rows)
and ShardEnds, never latents: per in-flight shard it holds one record per unit, a few hundred
bytes plus its ledger rows. Records are keyed by (shard, unit), so a unit retried by Ray (after a
lost node or actor) cannot be counted twice. A shard is committed when its end row and all its
units are in and nothing failed; a shard whose input could not be read, or one of whose units
failed for a reason that was not its input, is reported and left uncommitted for the next run.
"""
import time
from collections import Counter
from dataclasses import dataclass, field

from encoder_service import metrics
from encoder_service.job import latent_stats, qa
from encoder_service.job.plan import Plan
from encoder_service.records import LedgerRow, QaRow, ShardEnd, StageRow, UnitResult
from encoder_service.shards.schema import SCHEMA_VERSION
from encoder_service.shards.writer import commit_shard, remove_staging
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
    """What this invocation did (the folder's totals come from the manifests)."""
    shards_done: int = 0
    clips: int = 0
    latents: int = 0
    latent_bytes: int = 0
    ledger: Counter = field(default_factory=Counter)      # "stage/reason" -> rows
    failed: dict = field(default_factory=dict)            # shard id -> reason
    encode_seconds: float = 0.0
    first_result: float | None = None
    driver_bytes: int = 0                                 # Arrow bytes the driver received
    clips_encoded: int = 0                                # as units come back, before their shard commits
    shards_ingested: int = 0                              # end rows seen ...
    clips_ingested: int = 0                               # ... and their clips: for the estimated total
    qa: list = field(default_factory=list)                # QA rows (dicts) of the shards committed


class Driver:
    def __init__(self, plan: Plan, on_progress=None):
        self.plan, self.states, self.totals = plan, {}, Totals()
        self.committed: dict[str, dict] = {}
        self.on_progress = on_progress or (lambda totals: None)
        self.history = {kind: latent_stats.of_manifests(plan.history.values(), kind) for kind in ("mean", "logvar")}

    def add(self, row: StageRow) -> None:
        if row.shard_id in self.committed or row.shard_id in self.totals.failed:
            return  # a late copy (Ray re-ran a task whose output was lost with a node): already final
        state = self.states.setdefault(row.shard_id, ShardState())
        t = self.totals
        if row.kind == "end" and state.end is None:
            state.end = row.end
            t.shards_ingested, t.clips_ingested = t.shards_ingested + 1, t.clips_ingested + row.end.clips
        elif row.kind == "result" and row.result.index not in state.results:
            state.results[row.result.index] = row.result
            t.encode_seconds += row.result.encode_seconds
            t.clips_encoded += row.result.clips - len(row.result.ledger)
            t.first_result = t.first_result or time.time()
        if state.finished():
            self._finish(row.shard_id, self.states.pop(row.shard_id))
        self.on_progress(self.totals)

    def _finish(self, shard_id: str, state: ShardState) -> None:
        failure = state.failure()
        if failure:
            remove_staging(self.plan.fs, self.plan.root, shard_id)
            self.totals.failed[shard_id] = failure
            metrics.inc("wfvae_shards", status="failed")
            return
        self._commit(shard_id, state)

    def _commit(self, shard_id: str, state: ShardState) -> None:
        start = time.perf_counter()
        results = [state.results[i] for i in sorted(state.results)]
        ledger = list(state.end.ledger) + [row for r in results for row in r.ledger]
        staged = {r.index: r.file for r in results if r.file is not None}
        latents = sum(f.rows for f in staged.values())
        reasons = Counter(f"{row.stage}/{row.reason}" for row in ledger)
        qa_rows = [q.__dict__ for q in sorted((q for r in results for q in r.qa), key=lambda q: q.key)]
        manifest = {"schema_version": SCHEMA_VERSION, "settings": self.plan.fingerprint, "run": self.plan.run_meta,
                    "checkpoint_sha256": self.plan.run_meta["vae_sha256"], "source_url": scrub(state.end.source_url),
                    "clips": state.end.clips, "latents": latents, "ledger_reasons": dict(sorted(reasons.items())),
                    "non_finite_rejected": reasons.get("encode/non_finite_latent", 0),
                    "stats": {"mean": latent_stats.merge([r.mean_stats for r in results]),
                              "logvar": latent_stats.merge([r.logvar_stats for r in results])},
                    "qa": qa_rows}
        self.committed[shard_id] = commit_shard(self.plan.fs, self.plan.root, shard_id, staged, ledger,
                                                self.plan.run_meta, manifest)
        self.totals.qa += qa_rows
        self._count(state.end.clips, latents, sum(f.bytes for f in staged.values()), reasons)
        self._report_quality()
        metrics.observe("wfvae_write_seconds", time.perf_counter() - start)

    def _count(self, clips: int, latents: int, latent_bytes: int, reasons: Counter) -> None:
        t = self.totals
        t.shards_done, t.clips, t.latents, t.latent_bytes = (t.shards_done + 1, t.clips + clips, t.latents + latents,
                                                             t.latent_bytes + latent_bytes)
        t.ledger.update(reasons)
        metrics.inc("wfvae_shards", status="done")
        metrics.inc("wfvae_latents_written", latents)
        metrics.inc("wfvae_latent_bytes_written", latent_bytes)
        for key, n in reasons.items():
            stage, reason = key.split("/", 1)
            metrics.inc("wfvae_errors", n, stage=stage, reason=reason)

    def quality(self) -> dict:
        """This run's latent statistics, their drift against the folder's history, and the QA figures."""
        run = {kind: latent_stats.of_manifests(self.committed.values(), kind) for kind in ("mean", "logvar")}
        return {"stats": run, "drift": {kind: latent_stats.drift(run[kind], self.history[kind]) for kind in run},
                "drift_bounds": {"mean_shift_ratio": latent_stats.MAX_MEAN_SHIFT,
                                 "std_ratio": latent_stats.MAX_STD_RATIO},
                "qa": qa.summarize(self.totals.qa)}

    def _report_quality(self) -> None:
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


__all__ = ["Driver", "LedgerRow", "QaRow", "Totals"]
