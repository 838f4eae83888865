"""Per-channel latent statistics: gathered as sums in each encoder call, merged per shard (kept in
its manifest), per run and per folder, and compared with the folder's history to catch a changed
checkpoint, precision or a broken build (the LatentStatisticsDrift alert)."""
from encoder_service.records import ChannelStats

# the alert's bound, also reported in the run record: a channel mean that moved by more than half a
# historical standard deviation, or a standard deviation that changed by more than 25 %
MAX_MEAN_SHIFT, MAX_STD_RATIO = 0.5, 1.25


def merge(stats: list[ChannelStats | None]) -> dict | None:
    """Summed statistics -> {count, sum, sum_sq, mean, std} per channel."""
    stats = [s for s in stats if s is not None]
    if not stats:
        return None
    channels = range(len(stats[0].count))
    count = [sum(s.count[c] for s in stats) for c in channels]
    total = [sum(s.sum[c] for s in stats) for c in channels]
    squares = [sum(s.sum_sq[c] for s in stats) for c in channels]
    mean = [t / n for t, n in zip(total, count)]
    std = [max(0.0, q / n - m * m) ** 0.5 for q, n, m in zip(squares, count, mean)]
    return {"count": count, "sum": total, "sum_sq": squares, "mean": mean, "std": std}


def from_summary(merged: dict | None) -> ChannelStats | None:
    """A merged summary back to sums (to merge it again)."""
    return ChannelStats(merged["count"], merged["sum"], merged["sum_sq"]) if merged else None


def of_manifests(manifests, kind: str) -> dict | None:
    """The merged statistics of `kind` (mean | logvar) over manifests."""
    return merge([from_summary((m.get("stats") or {}).get(kind)) for m in manifests])


def drift(run: dict | None, history: dict | None) -> dict:
    """How far this run's per-channel statistics are from the history's: the largest mean shift in
    historical standard deviations, and the largest std ratio (either way). No history: 0 and 1."""
    if not run or not history or len(run["mean"]) != len(history["mean"]):
        return {"mean_shift_ratio": 0.0, "std_ratio": 1.0, "history": bool(run and history), "alert": False}
    shift = max(abs(m - h) / max(s, 1e-12) for m, h, s in zip(run["mean"], history["mean"], history["std"]))
    ratio = max(max(a, 1e-12) / max(b, 1e-12) for a, b in zip(run["std"], history["std"]))
    ratio = max(ratio, max(max(b, 1e-12) / max(a, 1e-12) for a, b in zip(run["std"], history["std"])))
    return {"mean_shift_ratio": shift, "std_ratio": ratio, "history": True,
            "alert": shift > MAX_MEAN_SHIFT or ratio > MAX_STD_RATIO}
