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
from encoder_service.job.plan import Plan
from encoder_service.records import ChannelStats, LedgerRow, ShardEnd, StageRow, UnitResult
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


def merge_stats(stats: list[ChannelStats | None]) -> dict | None:
    """Per-channel mean and std from summed statistics."""
    stats = [s for s in stats if s is not None]
    if not stats:
        return None
    count = [sum(s.count[c] for s in stats) for c in range(len(stats[0].count))]
    total = [sum(s.sum[c] for s in stats) for c in range(len(count))]
    squares = [sum(s.sum_sq[c] for s in stats) for c in range(len(count))]
    mean = [t / n for t, n in zip(total, count)]
    std = [max(0.0, q / n - m * m) ** 0.5 for q, n, m in zip(squares, count, mean)]
    return {"count": count, "sum": total, "sum_sq": squares, "mean": mean, "std": std}


class Driver:
    def __init__(self, plan: Plan, on_progress=None):
        self.plan, self.states, self.totals = plan, {}, Totals()
        self.committed: dict[str, dict] = {}
        self.on_progress = on_progress or (lambda totals: None)

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
        manifest = {"schema_version": SCHEMA_VERSION, "settings": self.plan.fingerprint, "run": self.plan.run_meta,
                    "source_url": scrub(state.end.source_url), "clips": state.end.clips, "latents": latents,
                    "ledger_reasons": dict(sorted(reasons.items())),
                    "stats": {"mean": merge_stats([r.mean_stats for r in results]),
                              "logvar": merge_stats([r.logvar_stats for r in results])}}
        self.committed[shard_id] = commit_shard(self.plan.fs, self.plan.root, shard_id, staged, ledger,
                                                self.plan.run_meta, manifest)
        self._count(state.end.clips, latents, sum(f.bytes for f in staged.values()), reasons)
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

    def unfinished(self) -> dict[str, str]:
        """Shards whose rows never all arrived (the stream ended early): failed, uncommitted."""
        return {shard_id: "the run ended before all of the shard's units came back" for shard_id in self.states}


__all__ = ["Driver", "LedgerRow", "Totals", "merge_stats"]
