"""Training-side reader: a PyTorch IterableDataset over output folders (local or S3).

The reader follows the manifests: it reads exactly the data files a manifest lists, after checking
them against it (`verify="size"`: byte size and row count; `"checksum"`: sha256 too), once, when
the dataset is built; every page is also checked against its Parquet page checksum as it is read.
A file that fails either check is an error naming the file, never silently skipped or read.
Work is split by Parquet row group across DataLoader workers and distributed ranks, so every row
is read exactly once per epoch.
"""
import hashlib
import json
from collections import defaultdict

import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from encoder_service.storage import StorageOptions, filesystem, join
from encoder_service.table import layout
from encoder_service.table.manifest import ManifestUnreadable, check_files, list_manifests, read_manifest
from encoder_service.table.schema import decode_tensor, read_run_metadata

_PROVENANCE = ("source_url", "source_key", "clip_index", "frame_indices", "src_fps", "clip_fps", "src_hw",
               "rotation", "crop_box", "bucket", "vae_name", "vae_sha256", "precision")


class ShardError(RuntimeError):
    pass


def data_files(root: str, storage: StorageOptions | None = None, require_manifest: bool = True,
               verify: str = "size") -> list[str]:
    """The data files of an output folder: those its manifests list (checked), or with
    require_manifest=False every file in latents/."""
    fs, path = filesystem(root, storage)
    protocol = root.split("://")[0] + "://" if "://" in root else ""
    if not require_manifest:
        return [protocol + p for p in sorted(fs.glob(join(path, layout.LATENTS) + "/*.parquet"))]
    files = []
    for shard_id in list_manifests(fs, path):
        try:
            manifest = read_manifest(fs, path, shard_id)
            problem = check_files(fs, path, manifest, verify) if manifest else "manifest vanished"
        except ManifestUnreadable as exc:
            problem = str(exc)
        if problem:
            raise ShardError(f"{root}: shard {shard_id}: {problem}; re-run the encode job for this shard, or "
                             "pass require_manifest=False to read the folder anyway")
        files += [join(root, entry.name) for entry in manifest.files]
    return files


def open_parquet(url: str, storage: StorageOptions | None = None) -> pq.ParquetFile:
    fs, path = filesystem(url, storage)
    return pq.ParquetFile(fs.open(path, "rb"), page_checksum_verification=True)


class LatentShardDataset(IterableDataset):
    """Yields dicts: key, mean, logvar (tensors in their stored dtype unless `dtype` is given),
    latent_shape, provenance and `metadata` (parsed JSON); with `sample=True`, `latent` is a
    posterior sample seeded by (seed, key, epoch), else `latent` is the mean.
    With `batch_size`, items of the same latent shape are stacked into batches.
    `roots`: one output folder or several.
    """

    def __init__(self, roots: str | list[str], *, storage: StorageOptions | None = None,
                 dtype: torch.dtype | None = None, sample: bool = False, seed: int = 0,
                 require_manifest: bool = True, verify: str = "size", batch_size: int | None = None,
                 drop_last: bool = False, rank: int | None = None, world_size: int | None = None):
        self.storage, self.dtype, self.sample, self.seed = storage, dtype, sample, seed
        self.batch_size, self.drop_last, self.epoch = batch_size, drop_last, 0
        self.rank, self.world_size = rank, world_size
        self.files = [f for root in ([roots] if isinstance(roots, str) else roots)
                      for f in data_files(root, storage, require_manifest, verify)]
        if not self.files:
            raise ShardError(f"no latent data files in {roots!r}")
        self.units = [(url, rg) for url in self.files for rg in range(open_parquet(url, storage).num_row_groups)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
        current, file = None, None
        for url, rg in self._my_units():
            if url != current:
                current, file = url, open_parquet(url, self.storage)  # one open file at a time
            try:
                table = file.read_row_group(rg)
            except OSError as exc:  # a page whose checksum does not match, or a broken file
                raise ShardError(f"{url}: row group {rg} cannot be read ({exc}); the file is damaged: "
                                 "re-run the encode job for its shard") from exc
            meta = read_run_metadata(file.schema_arrow)
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
                **{k: row[k] for k in _PROVENANCE}, "span": row.get("span"), "caption": row.get("caption"),
                "run": run_meta}  # (span and caption: absent from files written before them)
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


__all__ = ["LatentShardDataset", "ShardError", "collate", "data_files", "open_parquet"]
