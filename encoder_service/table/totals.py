"""Totals of an output folder, merged one shard at a time: counts, per-channel latent statistics,
the QA summary, and the drift of a run's statistics against the folder's history.

Everything here is a running merge: adding a shard costs O(channels + histogram bins), whatever
the number of shards before it, so the driver (per commit), _summary.json and `inspect` use the
same code at any folder size. The latent statistics are sums per channel (count, sum, sum of
squares); the QA drifts are kept as log-histograms (SKETCH_BINS_PER_DECADE bins per decade), so
their p99 is exact to within one bin (2.3 % relative) and two summaries merge by adding.
"""
import dataclasses
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from encoder_service.records import ChannelStats, FolderTotals, QaRow, QaSummary, ShardRecord, ShardStats, Sketch

# the drift alert's bound, also reported in the run record: a channel mean that moved by more than
# half a historical standard deviation, or a standard deviation that changed by more than 25 %
MAX_MEAN_SHIFT, MAX_STD_RATIO = 0.5, 1.25
SKETCH_BINS_PER_DECADE = 100
_SKETCH_FLOOR = 1e-12          # values at or below it share the lowest bin
QA_NOTE = ("reconstruction figures reflect the checkpoint: with random weights (e.g. the demo's) they only "
           "show that the check runs")


# ---- per-channel statistics ----------------------------------------------------------------------
def add_stats(a: ChannelStats | None, b: ChannelStats | None) -> ChannelStats | None:
    if a is None or b is None:
        return a or b
    if len(a.count) != len(b.count):
        raise ValueError(f"statistics of {len(a.count)} and {len(b.count)} channels cannot be merged")
    return ChannelStats([x + y for x, y in zip(a.count, b.count)], [x + y for x, y in zip(a.sum, b.sum)],
                        [x + y for x, y in zip(a.sum_sq, b.sum_sq)])


def add_shard_stats(a: ShardStats, b: ShardStats) -> ShardStats:
    return ShardStats(add_stats(a.mean, b.mean), add_stats(a.logvar, b.logvar))


def channel_summary(stats: ChannelStats | None) -> dict | None:
    """Sums -> {count, sum, sum_sq, mean, std} per channel (what _summary.json and the metrics show)."""
    if stats is None:
        return None
    mean = [t / max(n, 1) for t, n in zip(stats.sum, stats.count)]
    std = [max(0.0, q / max(n, 1) - m * m) ** 0.5 for q, n, m in zip(stats.sum_sq, stats.count, mean)]
    return {"count": stats.count, "sum": stats.sum, "sum_sq": stats.sum_sq, "mean": mean, "std": std}


def drift(run: ChannelStats | None, history: ChannelStats | None) -> dict:
    """How far this run's per-channel statistics are from the history's: the largest mean shift in
    historical standard deviations, and the largest std ratio (either way). No history: 0 and 1."""
    r, h = channel_summary(run), channel_summary(history)
    if not r or not h or len(r["mean"]) != len(h["mean"]):
        return {"mean_shift_ratio": 0.0, "std_ratio": 1.0, "history": bool(r and h), "alert": False}
    shift = max(abs(m - hm) / max(s, 1e-12) for m, hm, s in zip(r["mean"], h["mean"], h["std"]))
    ratio = max(max(max(a, 1e-12) / max(b, 1e-12), max(b, 1e-12) / max(a, 1e-12)) for a, b in zip(r["std"], h["std"]))
    return {"mean_shift_ratio": shift, "std_ratio": ratio, "history": True,
            "alert": shift > MAX_MEAN_SHIFT or ratio > MAX_STD_RATIO}


# ---- QA: sketches and summaries --------------------------------------------------------------------
def _bin(value: float) -> int:
    return math.floor(math.log10(max(value, _SKETCH_FLOOR)) * SKETCH_BINS_PER_DECADE)


def sketch_of(values) -> Sketch:
    values = [float(v) for v in values]
    if not values:
        return Sketch()
    bins = Counter(_bin(v) for v in values)
    keys = sorted(bins)
    return Sketch(len(values), sum(values), max(values), keys, [bins[k] for k in keys])


def add_sketch(a: Sketch, b: Sketch) -> Sketch:
    if not b.count or not a.count:
        return b if not a.count else a
    bins = Counter(dict(zip(a.bins, a.counts)))
    bins.update(dict(zip(b.bins, b.counts)))
    keys = sorted(bins)
    return Sketch(a.count + b.count, a.total + b.total, max(a.max, b.max), keys, [bins[k] for k in keys])


def quantile(s: Sketch, q: float) -> float:
    """The q-quantile from the histogram: the upper edge of the bin holding it, capped by the max."""
    if not s.count:
        return 0.0
    rank, seen = q * s.count, 0
    for b, n in zip(s.bins, s.counts):
        seen += n
        if seen >= rank:
            return min(s.max, 10 ** ((b + 1) / SKETCH_BINS_PER_DECADE))
    return s.max


def qa_summary(rows: list[QaRow]) -> QaSummary:
    finite = [r.psnr for r in rows if math.isfinite(r.psnr)]
    return QaSummary(len(rows), sketch_of(r.drift_mean for r in rows), sketch_of(r.drift_logvar for r in rows),
                     sum(finite), len(finite), sum(r.ssim for r in rows))


def add_qa(a: QaSummary, b: QaSummary) -> QaSummary:
    return QaSummary(a.clips + b.clips, add_sketch(a.drift_mean, b.drift_mean),
                     add_sketch(a.drift_logvar, b.drift_logvar), a.psnr_sum + b.psnr_sum,
                     a.psnr_finite + b.psnr_finite, a.ssim_sum + b.ssim_sum)


def qa_report(qa: QaSummary) -> dict | None:
    """mean / p99 / max of the drifts, mean PSNR (finite ones) and SSIM; None without QA clips."""
    if not qa.clips:
        return None
    out = {"clips": qa.clips}
    for name in ("drift_mean", "drift_logvar"):
        s = getattr(qa, name)
        out[name] = {"mean": s.total / max(s.count, 1), "p99": quantile(s, 0.99), "max": s.max}
    out["psnr_db"] = qa.psnr_sum / qa.psnr_finite if qa.psnr_finite else float("inf")
    out["ssim"] = qa.ssim_sum / qa.clips
    out["note"] = QA_NOTE
    return out


# ---- shards and folders ---------------------------------------------------------------------------
def add_shard(t: FolderTotals, r: ShardRecord) -> None:
    """Merge one shard into the totals, in place: O(channels + bins)."""
    t.shards, t.clips, t.latents = t.shards + 1, t.clips + r.clips, t.latents + r.latents
    for reason, n in r.ledger_reasons.items():
        t.ledger_reasons[reason] = t.ledger_reasons.get(reason, 0) + n
    t.non_finite_rejected += r.non_finite_rejected
    t.file_bytes += r.file_bytes
    if r.checkpoint_sha256 and r.checkpoint_sha256 not in t.checkpoints:
        t.checkpoints = sorted([*t.checkpoints, r.checkpoint_sha256])
    t.stats = add_shard_stats(t.stats, r.stats)
    t.qa = add_qa(t.qa, r.qa)


def add_totals(a: FolderTotals, b: FolderTotals) -> FolderTotals:
    out = dataclasses.replace(a, ledger_reasons=dict(a.ledger_reasons))
    out.shards, out.clips, out.latents = a.shards + b.shards, a.clips + b.clips, a.latents + b.latents
    for reason, n in b.ledger_reasons.items():
        out.ledger_reasons[reason] = out.ledger_reasons.get(reason, 0) + n
    out.non_finite_rejected += b.non_finite_rejected
    out.file_bytes += b.file_bytes
    out.checkpoints = sorted(set(a.checkpoints) | set(b.checkpoints))
    out.stats, out.qa = add_shard_stats(a.stats, b.stats), add_qa(a.qa, b.qa)
    return out


def records_totals(t: pa.Table) -> FolderTotals:
    """Totals of many shard records (rows of the shards table) at once: Arrow and numpy, not a
    Python loop over statistics."""
    out = FolderTotals()
    if t.num_rows == 0:
        return out
    out.shards = t.num_rows
    out.clips, out.latents, out.non_finite_rejected, out.file_bytes = (
        int(pc.sum(t[c]).as_py() or 0) for c in ("clips", "latents", "non_finite_rejected", "file_bytes"))
    reasons = t["ledger_reasons"].combine_chunks()
    if len(reasons.keys):
        grouped = pa.table({"k": reasons.keys, "v": reasons.items}).group_by("k").aggregate([("v", "sum")])
        out.ledger_reasons = dict(zip(grouped["k"].to_pylist(), grouped["v_sum"].to_pylist()))
    out.checkpoints = sorted(c for c in pc.unique(t["checkpoint_sha256"]).to_pylist() if c)
    stats = t["stats"].combine_chunks()
    out.stats = ShardStats(_sum_stats(stats.field("mean")), _sum_stats(stats.field("logvar")))
    out.qa = _sum_qa(t["qa"].combine_chunks())
    return out


def _sum_qa(qa: pa.StructArray) -> QaSummary:
    """QA summaries of many shards merged at once: sums, maxima, and histograms added per bin."""
    def total(array, how="sum"):
        return (pc.sum(array) if how == "sum" else pc.max(array)).as_py() or 0
    present = qa.filter(pc.greater(qa.field("clips"), 0))
    if len(present) == 0:
        return QaSummary()
    sketches = []
    for name in ("drift_mean", "drift_logvar"):
        s = present.field(name)
        bins = pa.table({"b": pc.list_flatten(s.field("bins")), "c": pc.list_flatten(s.field("counts"))})
        merged = bins.group_by("b").aggregate([("c", "sum")]).sort_by("b")
        sketches.append(Sketch(int(total(s.field("count"))), float(total(s.field("total"))),
                               float(total(s.field("max"), "max")), merged["b"].to_pylist(),
                               merged["c_sum"].to_pylist()))
    return QaSummary(int(total(present.field("clips"))), *sketches, float(total(present.field("psnr_sum"))),
                     int(total(present.field("psnr_finite"))), float(total(present.field("ssim_sum"))))


def _sum_stats(column: pa.StructArray) -> ChannelStats | None:
    present = column.filter(column.is_valid())
    if len(present) == 0:
        return None
    sums = []
    for name in ("count", "sum", "sum_sq"):
        lists = present.field(name)
        channels = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
        if (channels != channels[0]).any():
            raise ValueError("the shards table holds statistics with different channel counts")
        values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).reshape(len(present), int(channels[0]))
        sums.append(values.sum(axis=0, dtype=np.int64 if name == "count" else np.float64).tolist())
    return ChannelStats(*sums)


def folder_report(t: FolderTotals) -> dict:
    """The folder's totals as _summary.json and `inspect --json` show them."""
    return {"shards": t.shards, "clips": t.clips, "latents": t.latents,
            "ledger_rows": sum(t.ledger_reasons.values()), "ledger_by_reason": dict(sorted(t.ledger_reasons.items())),
            "latent_file_bytes": t.file_bytes, "non_finite_rejected": t.non_finite_rejected,
            "checkpoints": t.checkpoints,
            "stats": {"mean": channel_summary(t.stats.mean), "logvar": channel_summary(t.stats.logvar)},
            "qa": qa_report(t.qa)}


def quality_report(run: FolderTotals, history: FolderTotals) -> dict:
    """A run's statistics, their drift against the folder's history, and its QA figures."""
    return {"stats": {"mean": channel_summary(run.stats.mean), "logvar": channel_summary(run.stats.logvar)},
            "drift": {kind: drift(getattr(run.stats, kind), getattr(history.stats, kind))
                      for kind in ("mean", "logvar")},
            "drift_bounds": {"mean_shift_ratio": MAX_MEAN_SHIFT, "std_ratio": MAX_STD_RATIO},
            "qa": qa_report(run.qa)}
