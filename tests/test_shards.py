"""Output folders: exact write -> read, manifests that expose partial writes and corruption, a plain
Parquet dataset for other readers, worker/rank splits, S3."""
import json

import pyarrow.dataset
import pyarrow.parquet as pq
import pytest
import torch
from services import make_bucket, s3_server  # noqa: F401
from torch.utils.data import DataLoader

from encoder_service.options import dtype_name
from encoder_service.records import DataFile, LatentRow, LedgerRow, Manifest, RunMeta, ShardStats
from encoder_service.table import (
    SCHEMA_VERSION,
    LatentShardDataset,
    ShardError,
    ShardStatus,
    StagingWriter,
    commit_shard,
    encode_tensor,
    layout,
    shard_status,
)
from encoder_service.storage import filesystem

RUN = RunMeta("wfvae-l-16chn", "ab" * 32, "bf16", "test", [0.18215] * 16, [0.0] * 16, "s1")
SHAPES = [(16, 9, 4, 4), (16, 1, 8, 6), (8, 5, 2, 4)]


def latent_row(key, mean, logvar) -> LatentRow:
    return LatentRow(key, "s3://in/shard-000.tar", key.split("/")[1], 0, list(range(33)), 30.0, 30.0, [720, 1280], 0,
                     [0, 80, 256, 256], "33x256x256", json.dumps({"caption": key}), None, None, encode_tensor(mean),
                     None if logvar is None else encode_tensor(logvar), list(mean.shape), dtype_name(mean.dtype),
                     RUN.vae_name, RUN.vae_sha256, [0.18215] * mean.shape[0], [0.0] * mean.shape[0],
                     RUN.precision, RUN.pipeline_version)


def make_rows(dtype, n=6, shard="000", seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        mean = (torch.randn(shape, generator=g) * 3).to(dtype)
        tensors[f"{shard}/s{i:03d}/0"] = (mean, (torch.randn(shape, generator=g) - 4).to(dtype))
    return tensors, [latent_row(k, m, lv) for k, (m, lv) in tensors.items()]


def write(url, shard, rows, errors=(), storage=None, units=1, row_group_bytes=64 << 20):
    """What a run does: encoder actors stage one file per unit, the driver commits the shard."""
    fs, root = filesystem(url, storage)
    writer = StagingWriter(fs, root, RUN, row_group_bytes)
    per = -(-len(rows) // units)
    staged = {u: writer.write(shard, u, rows[u * per:(u + 1) * per]) for u in range(units)}
    manifest = Manifest(SCHEMA_VERSION, shard, "s1", RUN, "s3://in/shard.tar", None, len(rows), len(rows), {}, 0,
                        ShardStats(), [], [], DataFile("", 0, 0, ""))
    return commit_shard(fs, root, manifest, staged, list(errors))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_local_write_read_is_bit_exact(tmp_path, dtype):
    tensors, rows = make_rows(dtype)
    write(str(tmp_path), "000", rows, units=2)
    items = {it["key"]: it for it in LatentShardDataset(str(tmp_path))}
    assert set(items) == set(tensors)
    for key, (mean, logvar) in tensors.items():
        assert items[key]["mean"].dtype == dtype and torch.equal(items[key]["mean"], mean)
        assert torch.equal(items[key]["logvar"], logvar)
        assert items[key]["metadata"] == {"caption": key} and items[key]["bucket"] == "33x256x256"


def test_s3_write_read_is_bit_exact(s3_server):  # noqa: F811
    storage = s3_server.storage
    bucket = make_bucket(storage, "latents")
    tensors, rows = make_rows(torch.bfloat16)
    write(f"{bucket}/run1", "000", rows, storage=storage, units=2)
    fs, root = filesystem(f"{bucket}/run1", storage)
    assert shard_status(fs, root, "000", "s1", verify="checksum").status == ShardStatus.COMPLETE
    items = {it["key"]: it for it in LatentShardDataset(f"{bucket}/run1", storage=storage, verify="checksum")}
    assert all(torch.equal(items[k]["mean"], m) for k, (m, _) in tensors.items())
    assert not fs.exists(f"{root}/{layout.STAGING}/000")


def test_layout_is_a_plain_parquet_dataset(tmp_path):
    """latents/ holds latent rows and nothing else: other readers take the folder as it is."""
    _, rows = make_rows(torch.float32, n=5)
    write(str(tmp_path), "000", rows, [LedgerRow("000/bad", "x.tar", "probe", "corrupt", "m")], units=3)
    manifest = json.loads((tmp_path / layout.manifest_name("000")).read_text())
    assert [f["name"] for f in manifest["files"]] == [layout.data_name("000", u) for u in range(3)]
    latents = pyarrow.dataset.dataset(str(tmp_path / layout.LATENTS)).to_table()
    assert latents.num_rows == 5 and "mean" in latents.column_names
    assert pyarrow.dataset.dataset(str(tmp_path / layout.ERRORS)).to_table().to_pylist() == [
        {"key": "000/bad", "source_url": "x.tar", "stage": "probe", "reason": "corrupt", "message": "m"}]


def test_rewrite_is_byte_identical_and_order_independent(tmp_path):
    _, rows = make_rows(torch.bfloat16)
    write(str(tmp_path / "a"), "000", rows)
    write(str(tmp_path / "b"), "000", list(reversed(rows)))
    for name in (layout.data_name("000", 0), layout.manifest_name("000"), layout.errors_name("000")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_redone_shard_leaves_no_stale_file(tmp_path):
    _, rows = make_rows(torch.float32, n=6)
    write(str(tmp_path), "000", rows, units=3)
    write(str(tmp_path), "000", rows, units=1)  # the same shard again, in fewer files
    assert sorted(p.name for p in (tmp_path / layout.LATENTS).iterdir()) == ["part-000-00000.parquet"]
    assert len(list(LatentShardDataset(str(tmp_path)))) == 6


def test_partial_shards_are_detected(tmp_path):
    _, rows = make_rows(torch.float32)
    write(str(tmp_path), "000", rows)
    fs, root = filesystem(str(tmp_path))
    assert shard_status(fs, root, "000", "s1").status == ShardStatus.COMPLETE
    assert shard_status(fs, root, "000", "other-settings").status == ShardStatus.PARTIAL
    manifest_file = tmp_path / layout.manifest_name("000")
    good = json.loads(manifest_file.read_text())

    files = [{**good["files"][0], "rows": good["files"][0]["rows"] + 1}]
    manifest_file.write_text(json.dumps({**good, "files": files}))
    verdict = shard_status(fs, root, "000", "s1")
    assert verdict.status == ShardStatus.PARTIAL and "rows" in verdict.reason
    with pytest.raises(ShardError, match="manifest says"):
        LatentShardDataset(str(tmp_path))

    manifest_file.unlink()
    assert shard_status(fs, root, "000").status == ShardStatus.PARTIAL
    assert len(list(LatentShardDataset(str(tmp_path), require_manifest=False))) == len(rows)
    assert shard_status(fs, root, "001").status == ShardStatus.MISSING


def test_corrupted_bytes_are_an_error_naming_the_file(tmp_path):
    """Flipped bytes of the same size: the checksum policy sees them, and so does every read (page
    checksums), even with the cheap size check."""
    _, rows = make_rows(torch.float32, n=6)
    write(str(tmp_path), "000", rows)
    part = tmp_path / layout.data_name("000", 0)
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a data page
    part.write_bytes(bytes(data))
    fs, root = filesystem(str(tmp_path))
    assert shard_status(fs, root, "000", "s1", verify="size").status == ShardStatus.COMPLETE
    assert shard_status(fs, root, "000", "s1", verify="checksum").status == ShardStatus.PARTIAL
    with pytest.raises(ShardError, match="checksum differs"):
        LatentShardDataset(str(tmp_path), verify="checksum")
    with pytest.raises(ShardError, match="part-000-00000.parquet.*damaged"):
        list(LatentShardDataset(str(tmp_path)))


def test_workers_and_ranks_read_every_row_once(tmp_path):
    for s in range(3):
        _, rows = make_rows(torch.bfloat16, n=10, shard=f"00{s}", seed=s)
        write(str(tmp_path), f"00{s}", rows, units=2, row_group_bytes=2000)  # several row groups per file
    all_keys = [it["key"] for it in LatentShardDataset(str(tmp_path))]
    assert len(all_keys) == len(set(all_keys)) == 30
    seen = []
    for rank in range(2):
        ds = LatentShardDataset(str(tmp_path), rank=rank, world_size=2)
        seen += [it["key"] for it in DataLoader(ds, batch_size=None, num_workers=2)]
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
    table = pq.read_table(tmp_path / layout.data_name("000", 0))
    row = table.slice(0, 1).to_pylist()[0]
    mean = torch.frombuffer(bytearray(row["mean"]), dtype=torch.float32).reshape(row["latent_shape"])
    assert torch.equal(mean, tensors[row["key"]][0])
    assert table.schema.metadata[b"wfvae.schema_version"] == SCHEMA_VERSION.encode() == b"3"
