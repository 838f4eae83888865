"""LatentShardDataset: what a diffusion trainer reads, a PyTorch IterableDataset over one pinned
version of one or more output folders (Delta tables), local or on S3.

Opening reads each table's log (its last checkpoint and the commits after it): the files, their
row counts and buckets come from the log's statistics, with no request per shard or per file.
Each epoch follows a plan (reader/plan.py): files permuted per (seed, epoch), the same number of
batches on every rank, batches of one bucket (one latent shape), rows mixed within windows of about
`shuffle_buffer` rows. A worker reads windows ahead on a thread pool, as far as `prefetch_bytes`
allows. Pages are checked against their Parquet checksums as they are read; a file the version
references that is missing or damaged is an error naming the file and its shard, never a skip.

Resuming: `state_dict()` / `load_state_dict()` (the protocol torchdata's StatefulDataLoader calls
in each worker) hold the epoch and the batches already yielded; the plan is deterministic, so a
restarted job yields exactly the batches it had not yielded yet, in the same order.
"""
import hashlib
import json
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from deltalake import DeltaTable
from torch.utils.data import IterableDataset, get_worker_info

from encoder_service.reader.plan import Batch, SnapshotFile, epoch_batches, rng
from encoder_service.storage import StorageOptions, is_local
from encoder_service.table.folder import FolderError, OutputFolder
from encoder_service.table.schema import RAW_DTYPES, decode_tensor

_PROVENANCE = ("source_url", "source_key", "clip_index", "frame_indices", "src_fps", "clip_fps", "src_hw",
               "rotation", "crop_box", "bucket", "vae_name", "vae_sha256", "precision", "span", "caption")
_OPEN_FILES = 4


class ShardError(RuntimeError):
    """A file the table version references cannot be read: names the file and its shard."""


class LatentShardDataset(IterableDataset):
    """Yields batches (with `batch_size`) or items: dicts with `latent` (the mean, or with
    `sample=True` a posterior sample seeded by (seed, epoch, key)), `mean`, `logvar`, `scale`,
    `shift` as tensors (stacked in batches), `text_embedding` (zero-padded to the batch's longest
    caption) and `text_mask` when the folder has text embeddings, and key, caption, span, bucket,
    provenance and `metadata`.

    folders: one output folder or several; version: the table version to read (one folder; None:
    the latest, recorded in `self.version`); weights: with several folders, each one's share of an
    epoch. shuffle (default True): permute files and mix rows per (seed, epoch); drop_last (True):
    rows that do not fill a batch on every rank wait for a later epoch (False: wrap around).
    rank/world_size: taken from torch.distributed when it is initialised.
    """

    def __init__(self, folders: str | list[str], *, version: int | None = None, weights: list[float] | None = None,
                 storage: StorageOptions | None = None, batch_size: int | None = None, shuffle: bool = True,
                 shuffle_buffer: int = 1024, seed: int = 0, drop_last: bool = True, sample: bool = False,
                 dtype: torch.dtype | None = None, prefetch_bytes: int = 256 << 20, pin_memory: bool = False,
                 rank: int | None = None, world_size: int | None = None):
        folders = [folders] if isinstance(folders, str) else list(folders)
        if version is not None and len(folders) != 1:
            raise ValueError("version= pins one folder's table; open several folders at their latest versions")
        self.folders = [OutputFolder(f, storage) for f in folders]
        self.weights = list(weights) if weights is not None else [1.0] * len(folders)
        if len(self.weights) != len(folders) or any(not w >= 0 for w in self.weights) or not sum(self.weights) > 0:
            raise ValueError(f"weights must be {len(folders)} non-negative numbers, not all 0, got {weights!r}")
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.block = batch_size or max(1, min(shuffle_buffer, 256))  # rows read together (items: in blocks)
        self.shuffle_buffer = shuffle_buffer
        self.sample, self.dtype, self.prefetch_bytes = sample, dtype, prefetch_bytes
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.rank, self.world_size = rank, world_size
        self.epoch, self.yielded = 0, 0
        tables = [self._open(f, version) for f in self.folders]
        self.version = tables[0].version() if len(tables) == 1 else [t.version() for t in tables]
        self.files = self._snapshot(tables)
        if not self.files:
            raise ShardError(f"no latent data files in {folders!r} (version {self.version})")
        self.window_batches = self._window_batches()

    def _window_batches(self) -> dict[str, int]:
        """Batches mixed together per group: about shuffle_buffer rows, but never more than half of
        prefetch_bytes (the rows of a window are held at once; the other half reads ahead)."""
        row_bytes: dict[str, float] = {}
        for f in self.files:
            row_bytes[f.group] = max(row_bytes.get(f.group, 0.0), f.bytes / max(1, f.rows))
        if not self.shuffle:
            return dict.fromkeys(row_bytes, 1)
        return {g: max(1, min(self.shuffle_buffer // self.block, int(self.prefetch_bytes / 2 // (b * self.block))))
                for g, b in row_bytes.items()}

    # ---- the snapshot ---------------------------------------------------------------------------
    @staticmethod
    def _open(folder: OutputFolder, version: int | None) -> DeltaTable:
        try:
            return folder.latents(version)
        except FolderError as exc:
            raise ShardError(str(exc)) from None

    def _snapshot(self, tables: list[DeltaTable]) -> list[SnapshotFile]:
        """Every data file of the pinned versions, from the logs (rows and buckets: their statistics)."""
        fingerprints = [(OutputFolder.settings(t) or {}).get("fingerprint", "") for t in tables]
        mixed = len(set(fingerprints)) > 1
        out = []
        for k, (folder, table) in enumerate(zip(self.folders, tables)):
            files = OutputFolder.files(table)
            columns = (files[c].to_pylist() for c in ("path", "shard_id", "rows", "bytes", "bucket"))
            for path, sid, rows, size, bucket in zip(*columns):
                if rows is None or bucket is None:
                    raise ShardError(f"{folder.url}: {path} has no row count or bucket in the log; migrate the "
                                     "folder again (python -m encoder_service migrate)")
                group = f"{fingerprints[k]}/{bucket}" if mixed else bucket
                out.append(SnapshotFile(k, folder.path(path), sid, rows, size, group))
        return out

    # ---- epochs and state -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Like DistributedSampler.set_epoch: the next iteration reads epoch `epoch` from its start."""
        self.epoch, self.yielded = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded, "seed": self.seed, "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != self.version or state.get("seed") != self.seed:
            raise ValueError(f"this state was saved reading version {state.get('version')} with seed "
                             f"{state.get('seed')}; the dataset reads version {self.version} with seed {self.seed}: "
                             "open it with version=... and the same seed to resume")
        self.epoch, self.yielded = state["epoch"], state["yielded"]

    def _placement(self) -> tuple[int, int, int, int]:
        rank, world = self.rank, self.world_size
        if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        return rank or 0, world or 1, (info.id if info else 0), (info.num_workers if info else 1)

    def batches(self) -> list[Batch]:
        """This rank's and worker's batches of the current epoch, in order."""
        rank, world, worker, workers = self._placement()
        planned = epoch_batches(self.files, self.weights, self.batch_size or 1, rank, world, self.seed, self.epoch,
                                self.drop_last, self.shuffle, self.block)
        return planned[worker::workers]

    def __len__(self) -> int:
        """Batches (or items) per epoch on this rank, over all its workers."""
        rank, world, _, _ = self._placement()
        planned = epoch_batches(self.files, self.weights, self.batch_size or 1, rank, world, self.seed, self.epoch,
                                self.drop_last, self.shuffle, self.block)
        return len(planned) if self.batch_size else sum(sum(s.stop - s.start for s in b.segments) for b in planned)

    # ---- reading ------------------------------------------------------------------------------------
    def __iter__(self):
        """The epoch's batches (or items) this rank and worker have not yielded yet; `yielded` counts
        batches (items without a batch size), so a restored state skips exactly those."""
        mine = self.batches()
        sizes = np.cumsum([1 if self.batch_size else sum(s.stop - s.start for s in b.segments) for b in mine])
        first = int(np.searchsorted(sizes, self.yielded, side="right"))
        reader = _WindowReader(self, mine)
        try:
            for i in range(first, len(mine)):
                rows = reader.rows(i)
                if self.batch_size:
                    self.yielded = i + 1
                    yield self._batch(rows)
                    continue
                done = int(sizes[i - 1]) if i else 0
                for j in range(self.yielded - done, rows.num_rows):
                    self.yielded = done + j + 1
                    yield self._items(rows.slice(j, 1))
        finally:
            reader.close()
        self.epoch, self.yielded = self.epoch + 1, 0

    def _items(self, rows: pa.Table) -> dict:
        batch = self._batch(rows)
        return {k: (v[0] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}

    def _batch(self, rows: pa.Table) -> dict:
        shape = tuple(rows["latent_shape"][0].as_py())
        stored = rows["latent_dtype"][0].as_py()
        keys = rows["key"].to_pylist()
        mean = decode_column(rows["mean"], shape, stored)
        logvar = decode_column(rows["logvar"], shape, stored) if rows["logvar"].null_count == 0 else None
        if self.dtype is not None:
            mean, logvar = mean.to(self.dtype), (logvar.to(self.dtype) if logvar is not None else None)
        out = {"key": keys, "latent": self._sample(keys, mean, logvar) if self.sample else mean, "mean": mean,
               "logvar": logvar, "latent_shape": shape, "latent_dtype": stored,
               "scale": torch.tensor(rows["scale"].to_pylist()), "shift": torch.tensor(rows["shift"].to_pylist()),
               "metadata": [json.loads(m or "null") for m in rows["metadata"].to_pylist()],
               **{k: (rows[k].to_pylist() if k in rows.column_names else [None] * rows.num_rows) for k in _PROVENANCE}}
        out.update(text_embeddings(rows, self.dtype))
        if self.pin_memory:
            out = {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
        return out

    def _sample(self, keys: list[str], mean: torch.Tensor, logvar: torch.Tensor | None) -> torch.Tensor:
        if logvar is None:
            raise ShardError(f"{keys[0]}: sample=True needs logvar, but this run stored none")
        eps = torch.stack([torch.randn(mean.shape[1:], dtype=torch.float32, generator=torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(f"{self.seed}/{self.epoch}/{k}".encode()).digest()[:8], "little")))
            for k in keys])
        return (mean.float() + torch.exp(0.5 * logvar.float().clamp(-30, 20)) * eps).to(mean.dtype)


def text_embeddings(rows: pa.Table, dtype: torch.dtype | None = None) -> dict:
    """`text_embedding` (B, longest caption's tokens, d_model), zero-padded, and `text_mask` (B, tokens),
    True on a caption's own tokens; rows without an embedding are all padding. None when no row of
    the batch has one (or the folder was made without --text-encoder)."""
    if "text_embedding" not in rows.column_names or rows["text_embedding"].null_count == rows.num_rows:
        return {"text_embedding": None, "text_mask": None, "text_tokens": [None] * rows.num_rows}
    shapes, dtypes = rows["text_embedding_shape"].to_pylist(), rows["text_embedding_dtype"].to_pylist()
    tensors = [decode_tensor(data, shape, kind) if data is not None else None for data, shape, kind in
               zip(rows["text_embedding"].to_pylist(), shapes, dtypes)]
    width = next(s[1] for s in shapes if s)
    longest = max(s[0] for s in shapes if s)
    stored = next(t.dtype for t in tensors if t is not None)
    out = torch.zeros((rows.num_rows, longest, width), dtype=dtype or stored)
    mask = torch.zeros((rows.num_rows, longest), dtype=torch.bool)
    for i, t in enumerate(tensors):
        if t is not None:
            out[i, :t.shape[0]], mask[i, :t.shape[0]] = t, True
    return {"text_embedding": out, "text_mask": mask, "text_tokens": rows["text_tokens"].to_pylist()}


def decode_column(column: pa.ChunkedArray, shape: tuple, dtype: str) -> torch.Tensor:
    """Same-shape raw little-endian tensors of a binary column as one (rows, *shape) tensor, from the
    column's buffers in one copy (bf16 as its bit pattern)."""
    arr = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if pa.types.is_large_binary(arr.type) else np.int32)
    raw = memoryview(arr.buffers()[2])[offsets[arr.offset]:offsets[arr.offset + len(arr)]]
    array = np.frombuffer(raw, dtype=RAW_DTYPES[dtype]).astype(np.dtype(RAW_DTYPES[dtype]).newbyteorder("="))
    t = torch.from_numpy(array.reshape((len(column), *shape)))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class _WindowReader:
    """A worker's rows: its batches grouped into windows (window_batches consecutive batches of one
    group), each window read once, its rows permuted, and handed out batch by batch; windows ahead
    are read on a thread pool while their estimated bytes fit in prefetch_bytes."""

    def __init__(self, ds: LatentShardDataset, batches: list[Batch]):
        self.ds, self.batches = ds, batches
        self.window_of, self.windows = _windows(batches, ds.window_batches)
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="wfvae-read")
        self.futures: dict[int, object] = {}
        self.open: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self.row_bytes = {}

    def rows(self, i: int) -> pa.Table:
        w, pos = self.window_of[i]
        self._prefetch(i)
        table = self.futures[w].result()
        if pos == len(self.windows[w]) - 1:
            del self.futures[w]
        start = sum(self._size(self.batches[j]) for j in self.windows[w][:pos])
        return table.slice(start, self._size(self.batches[i]))

    def _size(self, b: Batch) -> int:
        return sum(s.stop - s.start for s in b.segments)

    def _prefetch(self, i: int) -> None:
        budget, seen = self.ds.prefetch_bytes, set()
        for j in range(i, len(self.batches)):
            w = self.window_of[j][0]
            if w in seen:
                continue
            seen.add(w)
            if w not in self.futures:
                if budget <= 0 and j > i:
                    return
                self.futures[w] = self.pool.submit(self._read_window, w)
            budget -= sum(self._bytes(self.batches[k]) for k in self.windows[w])

    def _bytes(self, b: Batch) -> int:
        return sum((s.stop - s.start) * self.row_bytes.get(s.file, 1 << 16) for s in b.segments)

    def _read_window(self, w: int) -> pa.Table:
        parts = [self._read(s.file, s.start, s.stop) for j in self.windows[w] for s in self.batches[j].segments]
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        if self.ds.shuffle and len(self.windows[w]) > 1:
            first = self.batches[self.windows[w][0]]
            order = rng(self.ds.seed, self.ds.epoch, w, first.index, len(first.group)).permutation(table.num_rows)
            table = table.take(order)
        return table

    def _read(self, index: int, start: int, stop: int) -> pa.Table:
        f = self.ds.files[index]
        try:
            pf = self._file(index)
            meta = pf.metadata
            ends = np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
            first, last = int(np.searchsorted(ends, start, side="right")), int(np.searchsorted(ends, stop - 1,
                                                                                                  side="right"))
            table = pf.read_row_groups(list(range(first, last + 1)), use_threads=False)
        except (OSError, ValueError) as exc:  # missing, a page whose checksum does not match, not Parquet
            raise ShardError(f"{f.uri} (shard {f.shard_id}, referenced by table version {self.ds.version}) cannot be "
                             f"read ({type(exc).__name__}: {exc}); re-run the encode job for this shard (delete its "
                             "record, or pass --verify-existing size)") from exc
        offset = int(ends[first - 1]) if first else 0
        self.row_bytes[index] = max(1, sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
                                    // max(1, int(ends[-1])))
        return table.slice(start - offset, stop - start)

    def _file(self, index: int) -> pq.ParquetFile:
        if index in self.open:
            self.open.move_to_end(index)
            return self.open[index]
        folder = self.ds.folders[self.ds.files[index].folder]
        uri = self.ds.files[index].uri
        pf = pq.ParquetFile(uri if is_local(folder.fs) else folder.fs.open(uri, "rb"), page_checksum_verification=True)
        self.open[index] = pf
        while len(self.open) > _OPEN_FILES:
            self.open.popitem(last=False)
        return pf

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _windows(batches: list[Batch], per_window: dict[str, int]) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """(window, position) of each batch, and each window's batches: consecutive batches of one group
    in the worker's order, per_window[group] at a time."""
    window_of, windows, current = [], [], {}
    for i, b in enumerate(batches):
        w = current.get(b.group)
        if w is None or len(windows[w]) >= per_window[b.group]:
            w = current[b.group] = len(windows)
            windows.append([])
        window_of.append((w, len(windows[w])))
        windows[w].append(i)
    return window_of, windows


def collate(items: list[dict]) -> dict:
    """Stack tensors of same-shape items; other fields become lists."""
    out = {}
    for k in items[0]:
        values = [it[k] for it in items]
        out[k] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


__all__ = ["LatentShardDataset", "ShardError", "collate", "decode_column"]
