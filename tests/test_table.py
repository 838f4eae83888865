"""Output folders as Delta tables: exact write -> read, every engine reads the table, a redone shard
replaced in one commit, damage found and named, S3 through moto."""
import json
import os

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from deltalake import DeltaTable
from services import make_bucket, s3_server  # noqa: F401
from tables import duplicate_keys, records, shard_ids

from benchmarks.synthetic_folder import commit_rows
from encoder_service.inspect import inspect_folder
from encoder_service.options import dtype_name
from encoder_service.reader import LatentShardDataset, ShardError
from encoder_service.records import LatentRow, LedgerRow, RunMeta
from encoder_service.table import layout
from encoder_service.table.folder import FolderError, OutputFolder
from encoder_service.table.schema import SCHEMA_VERSION, encode_tensor

RUN = RunMeta("wfvae-l-16chn", "ab" * 32, "bf16", "test", [0.18215] * 16, [0.0] * 16, "bench")
SHAPES = [(16, 9, 4, 4), (16, 1, 8, 6), (8, 5, 2, 4)]


def latent_row(key, mean, logvar) -> LatentRow:
    bucket = "x".join(str(d) for d in mean.shape[1:])  # one bucket per shape, as the job makes them
    return LatentRow(key, "s3://in/shard-000.tar", key.split("/")[1], 0, list(range(33)), 30.0, 30.0, [720, 1280], 0,
                     [0, 80, 256, 256], bucket, json.dumps({"caption": key}), None, f"caption {key}",
                     encode_tensor(mean), None if logvar is None else encode_tensor(logvar), list(mean.shape),
                     dtype_name(mean.dtype), RUN.vae_name, RUN.vae_sha256, [0.18215] * mean.shape[0],
                     [0.0] * mean.shape[0], RUN.precision, RUN.pipeline_version)


def make_rows(dtype, n=6, shard="000", seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        mean = (torch.randn(shape, generator=g) * 3).to(dtype)
        tensors[f"{shard}/s{i:03d}/0"] = (mean, (torch.randn(shape, generator=g) - 4).to(dtype))
    return tensors, [latent_row(k, m, lv) for k, (m, lv) in tensors.items()]


def items_of(url, storage=None) -> dict:
    return {it["key"]: it for it in LatentShardDataset(url, storage=storage, shuffle=False)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_local_write_read_is_bit_exact(tmp_path, dtype):
    tensors, rows = make_rows(dtype)
    commit_rows(str(tmp_path), {"000": rows}, run=RUN, rows_per_file=1)
    items = items_of(str(tmp_path))
    assert set(items) == set(tensors)
    for key, (mean, logvar) in tensors.items():
        assert items[key]["mean"].dtype == dtype and torch.equal(items[key]["mean"], mean)
        assert torch.equal(items[key]["logvar"], logvar)
        assert items[key]["metadata"] == {"caption": key} and items[key]["caption"] == f"caption {key}"


def test_s3_write_read_is_bit_exact(s3_server):  # noqa: F811
    storage = s3_server.storage
    bucket = make_bucket(storage, "latents")
    tensors, rows = make_rows(torch.bfloat16)
    commit_rows(f"{bucket}/run1", {"000": rows}, storage=storage, run=RUN)
    items = items_of(f"{bucket}/run1", storage)
    assert all(torch.equal(items[k]["mean"], m) for k, (m, _) in tensors.items())
    assert shard_ids(f"{bucket}/run1", storage) == {"000"}


def test_every_engine_reads_the_table_and_a_listing_is_not_the_dataset(tmp_path):
    """deltalake -> pyarrow, Polars, DuckDB over the version's file list and our reader all see each row
    once; after a shard is redone with other rows, latents/ still holds the old files (until vacuum),
    which only a directory listing sees."""
    _, rows = make_rows(torch.float32, n=6)
    ledger = [LedgerRow("000/bad", "x.tar", "probe", "corrupt", "m")]
    commit_rows(str(tmp_path), {"000": rows, "001": make_rows(torch.float32, 3, "001", 1)[1]}, {"000": ledger},
                run=RUN)
    _, fewer = make_rows(torch.float32, n=4, seed=7)
    commit_rows(str(tmp_path), {"000": fewer}, run=RUN)  # redone, from fewer videos
    dt = DeltaTable(str(tmp_path))
    assert dt.to_pyarrow_dataset().count_rows() == 7
    assert pl.read_delta(str(tmp_path)).height == 7
    assert duckdb.sql(f"SELECT count(*), count(DISTINCT key) FROM read_parquet({dt.file_uris()})").fetchall() == [
        (7, 7)]
    assert len(items_of(str(tmp_path))) == 7 and duplicate_keys(tmp_path) == 0
    listed = pq.ParquetDataset(str(tmp_path / layout.LATENTS)).read(columns=["key"]).num_rows
    assert listed > 7, "the old files stay on disk until vacuum: a listing is not the dataset"
    assert records(tmp_path)["000"]["latents"] == 4 and records(tmp_path)["000"]["ledger"] == []
    folder = OutputFolder(str(tmp_path))
    folder.finish(retention_hours=0)  # what the end of a run does, here with no retention
    assert pq.ParquetDataset(str(tmp_path / layout.LATENTS)).read(columns=["key"]).num_rows == 7


def test_rewrite_is_byte_identical_and_order_independent(tmp_path):
    _, rows = make_rows(torch.bfloat16)
    commit_rows(str(tmp_path / "a"), {"000": rows}, run=RUN)
    commit_rows(str(tmp_path / "b"), {"000": list(reversed(rows))}, run=RUN)
    a, b = (sorted(os.listdir(tmp_path / x / layout.LATENTS)) for x in "ab")
    assert a == b and all((tmp_path / "a" / layout.LATENTS / n).read_bytes() ==
                          (tmp_path / "b" / layout.LATENTS / n).read_bytes() for n in a)
    pf = pq.ParquetFile(tmp_path / "a" / layout.LATENTS / a[0])
    assert pf.schema_arrow.metadata[b"wfvae.schema_version"] == SCHEMA_VERSION.encode() == b"4"


def test_corrupted_bytes_are_an_error_naming_the_file_and_shard(tmp_path):
    """Flipped bytes of the same size: every read checks page checksums."""
    _, rows = make_rows(torch.float32, n=6)
    commit_rows(str(tmp_path), {"000": rows}, run=RUN)
    part = sorted((tmp_path / layout.LATENTS).iterdir())[0]
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a data page
    part.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{part.name} \(shard 000, referenced by table version 1\)"):
        list(LatentShardDataset(str(tmp_path), shuffle=False))
    part.unlink()
    with pytest.raises(ShardError, match=rf"{part.name} \(shard 000.*cannot be read"):
        list(LatentShardDataset(str(tmp_path), shuffle=False))


@pytest.mark.parametrize("damage", ["truncated commit", "random checkpoint", "foreign last checkpoint"])
def test_a_damaged_log_is_one_line_everywhere(tmp_path, damage):
    """Delta detects the damage; planning, inspect and the reader each say it in one line (the same
    damage done to both tables' logs: the reader reads the latents table's, inspect the shards')."""
    _, rows = make_rows(torch.float32, n=3)
    commit_rows(str(tmp_path), {"000": rows}, run=RUN)
    commit_rows(str(tmp_path), {"001": make_rows(torch.float32, 3, "001", 1)[1]}, run=RUN)
    for table in (tmp_path, tmp_path / "_shards"):
        log = table / "_delta_log"
        if damage == "truncated commit":
            path = log / f"{2:020d}.json"
            path.write_bytes(path.read_bytes()[:40])
        else:
            DeltaTable(str(table)).create_checkpoint()
            if damage == "random checkpoint":
                (log / f"{2:020d}.checkpoint.parquet").write_bytes(os.urandom(3000))
            else:
                (log / "_last_checkpoint").write_text('{"version": 7, "size": 3}')
    with pytest.raises(FolderError, match="Delta log cannot be read") as err:
        inspect_folder(str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(ShardError, match="Delta log cannot be read"):
        LatentShardDataset(str(tmp_path))
    with pytest.raises(FolderError, match="Delta log cannot be read"):  # what planning opens (JobError there)
        OutputFolder(str(tmp_path)).latents()


def test_inspect_of_a_folder_that_is_no_table_is_one_line(tmp_path, capsys):
    from encoder_service import cli
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "shard-000000.tar").write_bytes(b"")
    for folder, what in ((tmp_path / "nope", "does not exist"), (tmp_path / "tars", "holds no Delta table")):
        assert cli.main(["inspect", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0], err
