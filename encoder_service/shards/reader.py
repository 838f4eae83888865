"""Training-side reader: a PyTorch IterableDataset over latent shards (local or S3).

Work is split by Parquet row group across DataLoader workers and distributed ranks, so every
row is read exactly once per epoch. Shards whose manifest is missing or does not match are
refused unless `require_manifest=False`.
"""
import hashlib
import json
import posixpath
from collections import defaultdict

import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from encoder_service.shards.manifest import check_against_manifest, read_manifest
from encoder_service.shards.schema import decode_tensor, read_run_metadata
from encoder_service.storage import StorageOptions, filesystem, glob_urls

_PROVENANCE = ("source_url", "source_key", "clip_index", "frame_indices", "src_fps", "clip_fps", "src_hw",
               "crop_box", "bucket", "vae_name", "vae_sha256", "precision")


class ShardError(RuntimeError):
    pass


def expand_shards(urls: str | list[str], options: StorageOptions | None = None) -> list[str]:
    """A glob, a list of URLs, or a folder -> sorted part-*.parquet URLs."""
    out = []
    for url in [urls] if isinstance(urls, str) else urls:
        fs, path = filesystem(url, options)
        if fs.isdir(path):
            url = posixpath.join(url.rstrip("/"), "part-*.parquet")
        out += glob_urls(url, options) if any(c in url for c in "*?[") else [url]
    return sorted(set(out))


class LatentShardDataset(IterableDataset):
    """Yields dicts: key, mean, logvar (tensors in their stored dtype unless `dtype` is given),
    latent_shape, provenance and `metadata` (parsed JSON); with `sample=True`, `latent` is a
    posterior sample seeded by (seed, key, epoch), else `latent` is the mean.
    With `batch_size`, items of the same latent shape are stacked into batches.
    """

    def __init__(self, urls: str | list[str], *, storage: StorageOptions | None = None,
                 dtype: torch.dtype | None = None, sample: bool = False, seed: int = 0,
                 require_manifest: bool = True, verify: str = "size", batch_size: int | None = None,
                 drop_last: bool = False, rank: int | None = None, world_size: int | None = None):
        self.storage, self.dtype, self.sample, self.seed = storage, dtype, sample, seed
        self.require_manifest, self.verify = require_manifest, verify
        self.batch_size, self.drop_last, self.epoch = batch_size, drop_last, 0
        self.rank, self.world_size = rank, world_size
        self.shards = expand_shards(urls, storage)
        if not self.shards:
            raise ShardError(f"no latent shards match {urls!r}")
        self.units = [(url, rg) for url in self.shards for rg in range(self._open(url).num_row_groups)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _open(self, url: str) -> pq.ParquetFile:
        fs, path = filesystem(url, self.storage)
        if self.require_manifest:
            directory, name = posixpath.split(path)
            shard_id = name[len("part-"):-len(".parquet")]
            manifest = read_manifest(fs, directory, shard_id)
            problem = "no manifest (the write did not finish)" if manifest is None else \
                check_against_manifest(fs, directory, shard_id, manifest, self.verify)
            if problem:
                raise ShardError(f"{url}: {problem}; re-run the encode job for this shard, or pass "
                                 "require_manifest=False to read it anyway")
        return pq.ParquetFile(fs.open(path, "rb"))

    def _my_units(self):
        rank, world = self.rank, self.world_size
        if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        rank, world = rank or 0, world or 1
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.units[rank * workers + worker::world * workers]

    def __iter__(self):
        items = self._items()
        return self._batched(items) if self.batch_size else items

    def _items(self):
        files = {}
        for url, rg in self._my_units():
            if url not in files:
                files = {url: self._open(url)}  # one open file at a time
            table = files[url].read_row_group(rg)
            meta = read_run_metadata(files[url].schema_arrow)
            for row in table.to_pylist():
                yield self._item(row, meta)

    def _item(self, row: dict, run_meta: dict) -> dict:
        shape, stored = row["latent_shape"], row["latent_dtype"]
        mean = decode_tensor(row["mean"], shape, stored)
        logvar = decode_tensor(row["logvar"], shape, stored) if row["logvar"] is not None else None
        if self.dtype is not None:
            mean = mean.to(self.dtype)
            logvar = logvar.to(self.dtype) if logvar is not None else None
        item = {"key": row["key"], "mean": mean, "logvar": logvar, "latent_shape": tuple(shape),
                "latent_dtype": stored, "metadata": json.loads(row["metadata"] or "null"),
                "scale": torch.tensor(row["scale"]), "shift": torch.tensor(row["shift"]),
                **{k: row[k] for k in _PROVENANCE}, "run": run_meta}
        item["latent"] = self._sample(row["key"], mean, logvar) if self.sample else mean
        return item

    def _sample(self, key: str, mean: torch.Tensor, logvar: torch.Tensor | None) -> torch.Tensor:
        if logvar is None:
            raise ShardError(f"{key}: sample=True needs logvar, but this run stored none")
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}/{self.epoch}/{key}".encode()).digest()[:8], "little")
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        compute = mean.float() + torch.exp(0.5 * logvar.float().clamp(-30, 20)) * eps
        return compute.to(mean.dtype)

    def _batched(self, items):
        pending = defaultdict(list)
        for item in items:
            group = pending[item["latent_shape"]]
            group.append(item)
            if len(group) == self.batch_size:
                yield collate(group)
                group.clear()
        if not self.drop_last:
            for group in pending.values():
                if group:
                    yield collate(group)


def collate(items: list[dict]) -> dict:
    """Stack tensors of same-shape items; other fields become lists."""
    out = {}
    for k in items[0]:
        values = [it[k] for it in items]
        out[k] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


__all__ = ["LatentShardDataset", "ShardError", "collate", "expand_shards"]
