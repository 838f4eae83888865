"""An epoch's reading plan: which rows each rank and worker reads, in which order, as index
arithmetic over the snapshot's files (never over rows, never a request).

Every data file holds clips of one bucket (one encoder unit), so a file's rows, shape and bucket
are known from the log. For an epoch and seed:
  1. each folder's files are permuted; with weights, a folder contributes weight x (all rows) rows,
     taking its permuted files in turn (cycling through new permutations when it contributes more
     rows than it holds, stopping inside a file when it contributes fewer);
  2. per bucket, the rows so chosen form one sequence of segments (file, start, stop);
  3. every rank gets the same number of batches of each bucket, k = rows // (batch x ranks), as
     one contiguous stretch of that sequence: rows past k x batch x ranks are dropped this epoch
     (a new permutation next epoch drops others), or with drop_last=False the bucket's sequence is
     wrapped to fill k = ceil(...) batches; so all ranks run the same number of steps;
  4. a rank's batches of all buckets are interleaved in one order drawn from (seed, epoch), the
     same on every rank, so step i has the same shape on every rank;
  5. worker w of W takes the rank's batches i with i % W == w.
Rows are mixed within windows of about `shuffle_buffer` rows of one bucket (reader/dataset.py).
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SnapshotFile:
    folder: int           # index of its folder among the dataset's folders
    uri: str
    shard_id: str
    rows: int
    bytes: int            # its size in the log: what a window of its rows costs to hold
    group: str            # bucket (and folder settings, where folders differ): rows of one shape


@dataclass(frozen=True)
class Segment:
    file: int             # index into the dataset's files
    start: int
    stop: int


@dataclass(frozen=True)
class Batch:
    group: str
    index: int            # the batch's position within its group's stretch for this rank
    segments: tuple[Segment, ...]


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


def _folder_rows(files: list[SnapshotFile], idx: list[int], want: int, seed: int, epoch: int,
                 folder: int, shuffle: bool) -> list[Segment]:
    """`want` rows of one folder's files, in permuted order (cycling with fresh permutations)."""
    out, taken, cycle = [], 0, 0
    total = sum(files[i].rows for i in idx)
    while taken < want and total:
        order = rng(seed, epoch, folder, cycle).permutation(len(idx)) if shuffle else range(len(idx))
        for j in order:
            f = idx[j]
            n = min(files[f].rows, want - taken)
            if n > 0:
                out.append(Segment(f, 0, n))
                taken += n
        cycle += 1
    return out


def _take(segments: list[Segment], ends: np.ndarray, start: int, stop: int) -> list[Segment]:
    """Rows [start, stop) of a sequence of segments whose cumulative row counts are `ends`."""
    out = []
    for j in range(int(np.searchsorted(ends, start, side="right")), len(segments)):
        s, pos = segments[j], int(ends[j]) - (segments[j].stop - segments[j].start)
        if pos >= stop:
            break
        lo, hi = max(start, pos), min(stop, int(ends[j]))
        out.append(Segment(s.file, s.start + lo - pos, s.start + hi - pos))
    return out


def epoch_batches(files: list[SnapshotFile], weights: list[float], batch: int, rank: int, ranks: int,
                  seed: int, epoch: int, drop_last: bool, shuffle: bool = True,
                  block: int | None = None) -> list[Batch]:
    """The rank's batches of the epoch, in order (every rank gets as many). shuffle=False: files in
    the log's order and batches bucket by bucket (the same every epoch). block: rows per Batch when
    it differs from the rows per batch (items: ranks are equalised per row, read in blocks)."""
    block = block or batch
    folders = sorted({f.folder for f in files})
    total = sum(f.rows for f in files)
    norm = sum(weights[k] for k in folders) or 1.0
    by_group: dict[str, list[Segment]] = {}
    for k in folders:
        idx = [i for i, f in enumerate(files) if f.folder == k]
        want = round(weights[k] / norm * total) if len(folders) > 1 else sum(files[i].rows for i in idx)
        for seg in _folder_rows(files, idx, want, seed, epoch, k, shuffle):
            by_group.setdefault(files[seg.file].group, []).append(seg)
    batches: list[Batch] = []
    for group in sorted(by_group):
        segs = by_group[group]
        n = sum(s.stop - s.start for s in segs)
        per_rank = n // (batch * ranks) if drop_last else -(-n // (batch * ranks))
        if per_rank == 0:
            continue
        if not drop_last and per_rank * batch * ranks > n:  # wrap the sequence to fill the last batches
            segs = segs * (-(-(per_rank * batch * ranks) // n))
        ends, base, rows = np.cumsum([s.stop - s.start for s in segs]), rank * per_rank * batch, per_rank * batch
        batches += [Batch(group, i, tuple(_take(segs, ends, base + lo, base + min(rows, lo + block))))
                    for i, lo in enumerate(range(0, rows, block))]
    if not shuffle:
        return batches
    order = rng(seed, epoch, 0x5EED).permutation(len(batches))  # the same on every rank: same shapes per step
    return [batches[i] for i in order]
