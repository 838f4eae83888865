"""Latent shards: exact write -> read, manifests that expose partial writes, worker/rank splits, S3."""
import json

import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from encoder_service.shards import LatentShardDataset, ShardStatus, ShardWriter, shard_status
from encoder_service.shards.manifest import errors_name, manifest_name, part_name
from encoder_service.shards.reader import ShardError
from encoder_service.shards.schema import dtype_name, encode_tensor
from encoder_service.storage import filesystem
from services import make_bucket, s3_server  # noqa: F401

RUN = {"vae_name": "wfvae-l-16chn", "vae_sha256": "ab" * 32, "precision": "bf16-fp32norm", "pipeline_version": "test"}
SHAPES = [(16, 9, 4, 4), (16, 1, 8, 6), (8, 5, 2, 4)]


def latent_row(key, mean, logvar):
    return {"key": key, "source_url": "s3://in/shard-000.tar", "source_key": key.split("/")[1], "clip_index": 0,
            "frame_indices": list(range(0, 33)), "src_fps": 30.0, "clip_fps": 30.0, "src_hw": [720, 1280],
            "crop_box": [0, 80, 256, 256], "bucket": "33x256x256", "metadata": json.dumps({"caption": key}),
            "mean": encode_tensor(mean), "logvar": None if logvar is None else encode_tensor(logvar),
            "latent_shape": list(mean.shape), "latent_dtype": dtype_name(mean.dtype), "scale": [0.18215] * mean.shape[0],
            "shift": [0.0] * mean.shape[0], **RUN}


def make_rows(dtype, n=6, shard="000", seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        mean = (torch.randn(shape, generator=g) * 3).to(dtype)
        tensors[f"{shard}/s{i:03d}/0"] = (mean, (torch.randn(shape, generator=g) - 4).to(dtype))
    return tensors, [latent_row(k, m, lv) for k, (m, lv) in tensors.items()]


def write(url, shard, rows, errors=(), storage=None, **kw):
    fs, path = filesystem(url, storage)
    return ShardWriter(fs, path, RUN, **kw).write(shard, rows, list(errors))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_local_write_read_is_bit_exact(tmp_path, dtype):
    tensors, rows = make_rows(dtype)
    write(str(tmp_path), "000", rows)
    items = {it["key"]: it for it in LatentShardDataset(str(tmp_path))}
    assert set(items) == set(tensors)
    for key, (mean, logvar) in tensors.items():
        assert items[key]["mean"].dtype == dtype and torch.equal(items[key]["mean"], mean)
        assert torch.equal(items[key]["logvar"], logvar)
        assert items[key]["metadata"] == {"caption": key} and items[key]["bucket"] == "33x256x256"
        assert items[key]["run"]["vae_sha256"] == RUN["vae_sha256"]


def test_s3_write_read_is_bit_exact(s3_server):  # noqa: F811
    _, storage = s3_server
    bucket = make_bucket(storage, "latents")
    tensors, rows = make_rows(torch.bfloat16)
    write(f"{bucket}/run1", "000", rows, storage=storage)
    fs, path = filesystem(f"{bucket}/run1", storage)
    assert shard_status(fs, path, "000", verify="checksum").status == ShardStatus.COMPLETE
    items = {it["key"]: it for it in LatentShardDataset(f"{bucket}/run1/part-*.parquet", storage=storage)}
    for key, (mean, _) in tensors.items():
        assert torch.equal(items[key]["mean"], mean)


def test_rewrite_is_byte_identical_and_order_independent(tmp_path):
    _, rows = make_rows(torch.bfloat16)
    write(str(tmp_path / "a"), "000", rows)
    write(str(tmp_path / "b"), "000", list(reversed(rows)))
    assert (tmp_path / "a" / part_name("000")).read_bytes() == (tmp_path / "b" / part_name("000")).read_bytes()


def test_partial_shards_are_detected(tmp_path):
    _, rows = make_rows(torch.float32)
    write(str(tmp_path), "000", rows)
    fs, path = filesystem(str(tmp_path))
    assert shard_status(fs, path, "000").status == ShardStatus.COMPLETE
    manifest_file = tmp_path / manifest_name("000")
    good = json.loads(manifest_file.read_text())

    manifest_file.write_text(json.dumps({**good, "rows": good["rows"] + 1}))
    verdict = shard_status(fs, path, "000")
    assert verdict.status == ShardStatus.PARTIAL and "rows" in verdict.reason
    with pytest.raises(ShardError, match="manifest says"):
        LatentShardDataset(str(tmp_path))

    files = {**good["files"], part_name("000"): {**good["files"][part_name("000")], "sha256": "0" * 64}}
    manifest_file.write_text(json.dumps({**good, "files": files}))
    assert shard_status(fs, path, "000").status == ShardStatus.COMPLETE  # size check alone cannot see it
    assert shard_status(fs, path, "000", verify="checksum").status == ShardStatus.PARTIAL
    with pytest.raises(ShardError, match="checksum"):
        LatentShardDataset(str(tmp_path), verify="checksum")

    manifest_file.unlink()
    assert shard_status(fs, path, "000").status == ShardStatus.PARTIAL
    with pytest.raises(ShardError, match="no manifest"):
        LatentShardDataset(str(tmp_path))
    assert len(list(LatentShardDataset(str(tmp_path), require_manifest=False))) == len(rows)
    assert shard_status(fs, path, "001").status == ShardStatus.MISSING


def test_error_ledger_beside_the_shard(tmp_path):
    _, rows = make_rows(torch.float32, n=2)
    errors = [{"key": "000/bad", "source_url": "x.tar", "stage": "decode", "reason": "corrupt", "message": "m"}]
    manifest = write(str(tmp_path), "000", rows, errors)
    assert manifest["rows"] == 2 and manifest["error_rows"] == 1
    assert pq.read_table(tmp_path / errors_name("000")).to_pylist() == errors


def test_workers_and_ranks_read_every_row_once(tmp_path):
    for s in range(3):
        _, rows = make_rows(torch.bfloat16, n=10, shard=f"00{s}", seed=s)
        write(str(tmp_path), f"00{s}", rows, row_group_bytes=2000)  # several row groups per shard
    all_keys = [it["key"] for it in LatentShardDataset(str(tmp_path))]
    assert len(all_keys) == len(set(all_keys)) == 30
    seen = []
    for rank in range(2):
        ds = LatentShardDataset(str(tmp_path), rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        seen += [it["key"] for it in loader]
    assert sorted(seen) == sorted(all_keys)


def test_batches_by_shape_cast_and_seeded_samples(tmp_path):
    tensors, rows = make_rows(torch.bfloat16, n=9)
    write(str(tmp_path), "000", rows)
    batches = list(LatentShardDataset(str(tmp_path), batch_size=2, dtype=torch.float32))
    assert sum(len(b["key"]) for b in batches) == 9
    for b in batches:
        assert b["mean"].dtype == torch.float32 and b["mean"].shape[1:] == b["latent_shape"][0]
    a = {it["key"]: it["latent"] for it in LatentShardDataset(str(tmp_path), sample=True, seed=1)}
    b = {it["key"]: it["latent"] for it in LatentShardDataset(str(tmp_path), sample=True, seed=1)}
    c = {it["key"]: it["latent"] for it in LatentShardDataset(str(tmp_path), sample=True, seed=2)}
    key = next(iter(a))
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    assert not torch.equal(a[key], tensors[key][0])


def test_plain_pyarrow_can_read_it(tmp_path):
    tensors, rows = make_rows(torch.float32, n=3)
    write(str(tmp_path), "000", rows)
    table = pq.read_table(tmp_path / part_name("000"))
    row = table.slice(0, 1).to_pylist()[0]
    mean = torch.frombuffer(bytearray(row["mean"]), dtype=torch.float32).reshape(row["latent_shape"])
    assert torch.equal(mean, tensors[row["key"]][0])
    assert table.schema.metadata[b"wfvae.schema_version"] == b"1"
