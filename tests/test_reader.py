"""The training reader on a real table: a pinned version, deterministic shuffle, equal batches on
every rank (a real gloo group of 3 processes), exact mid-epoch resume (torchdata's
StatefulDataLoader with workers), batches of one bucket, mixed folders, S3 requests to open."""
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from services import make_bucket, s3_server  # noqa: F401
from test_table import RUN, latent_row
from torch.utils.data import DataLoader

from benchmarks.synthetic_folder import commit_rows
from encoder_service.reader import LatentShardDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"3x4x4": (16, 3, 4, 4), "2x8x6": (16, 2, 8, 6)}  # bucket -> latent shape (test_table's rows)


def uneven_folder(path, shards=7, seed=0, prefix="s") -> set[str]:
    """Shards of 3..11 rows over two buckets: uneven files, uneven buckets."""
    g = torch.Generator().manual_seed(seed)
    keys, by_shard = set(), {}
    for s in range(shards):
        rows = []
        for i in range(3 + (s * 5) % 9):
            shape = SHAPES["3x4x4"] if (s + i) % 3 else SHAPES["2x8x6"]
            mean = torch.randn(shape, generator=g).bfloat16()
            rows.append(latent_row(f"{prefix}{s:03d}/v{i:03d}/0", mean, mean))
        by_shard[f"{prefix}{s:03d}"] = rows
        keys |= {r.key for r in rows}
    commit_rows(str(path), by_shard, run=RUN, rows_per_file=4)
    return keys


def order(ds) -> list[str]:
    return [k for b in ds for k in (b["key"] if isinstance(b["key"], list) else [b["key"]])]


def test_a_pinned_version_is_unchanged_by_later_commits(tmp_path):
    uneven_folder(tmp_path)
    ds = LatentShardDataset(str(tmp_path), shuffle=False)
    before = order(ds)
    g = torch.Generator().manual_seed(9)
    extra = [latent_row(f"new/v{i}/0", m, m) for i in range(4) for m in [torch.randn(16, 3, 4, 4, generator=g)]]
    commit_rows(str(tmp_path), {"new": extra}, run=RUN)
    assert order(ds) == before and ds.version == 1
    assert len(order(LatentShardDataset(str(tmp_path), shuffle=False))) == len(before) + 4
    assert order(LatentShardDataset(str(tmp_path), version=1, shuffle=False)) == before


def test_the_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    keys = uneven_folder(tmp_path)
    a = LatentShardDataset(str(tmp_path), seed=1, shuffle_buffer=8)
    first, second = order(a), order(a)  # an iteration moves to the next epoch
    b = LatentShardDataset(str(tmp_path), seed=1, shuffle_buffer=8)
    assert order(b) == first
    b.set_epoch(1)
    assert order(b) == second != first
    assert order(LatentShardDataset(str(tmp_path), seed=2, shuffle_buffer=8)) != first
    assert set(first) <= keys and len(first) == len(set(first)) == len(keys)  # items: every row once (1 rank)


@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_hold_one_bucket_and_say_what_is_dropped(tmp_path, drop_last):
    keys = uneven_folder(tmp_path)
    ds = LatentShardDataset(str(tmp_path), batch_size=4, drop_last=drop_last, seed=3)
    batches = list(ds)
    assert all(len(set(b["bucket"])) == 1 and b["latent"].shape[0] == 4 for b in batches)
    assert all(b["latent"].shape[1:] == SHAPES[b["bucket"][0]] for b in batches)
    seen = Counter(k for b in batches for k in b["key"])
    assert len(batches) == len(ds)
    if drop_last:   # full batches only; each row at most once; what is left is < one batch per bucket
        assert max(seen.values()) == 1 and len(keys) - len(seen) < 4 * len(SHAPES)
    else:           # every row at least once; the last batch of a bucket wraps around
        assert set(seen) == keys and len(seen) > len(keys) - 1


def test_fields_for_training(tmp_path):
    uneven_folder(tmp_path)
    b = next(iter(LatentShardDataset(str(tmp_path), batch_size=2, sample=True, seed=5, dtype=torch.float32)))
    assert b["latent"].dtype == torch.float32 and not torch.equal(b["latent"], b["mean"])
    assert b["scale"].shape == (2, 16) and b["caption"][0].startswith("caption ") and b["span"] == [None, None]
    again = next(iter(LatentShardDataset(str(tmp_path), batch_size=2, sample=True, seed=5, dtype=torch.float32)))
    assert torch.equal(b["latent"], again["latent"])


def test_several_folders_mix_by_weight(tmp_path):
    a = uneven_folder(tmp_path / "a", shards=6, seed=1, prefix="a")
    b = uneven_folder(tmp_path / "b", shards=6, seed=2, prefix="b")
    ds = LatentShardDataset([str(tmp_path / "a"), str(tmp_path / "b")], weights=[3, 1], seed=0)
    share = Counter(k[0] for k in order(ds))
    total = len(a) + len(b)
    assert share["a"] == round(0.75 * total) and share["b"] == round(0.25 * total)  # a is drawn again
    with pytest.raises(ValueError, match="weights must be 2"):
        LatentShardDataset([str(tmp_path / "a"), str(tmp_path / "b")], weights=[1])


def test_workers_split_a_rank_without_overlap(tmp_path):
    keys = uneven_folder(tmp_path)
    ds = LatentShardDataset(str(tmp_path), seed=4)
    alone = order(ds)
    with_workers = [k for k in DataLoader(LatentShardDataset(str(tmp_path), seed=4), batch_size=None,
                                          num_workers=2)]
    got = [it["key"] for it in with_workers]
    assert sorted(got) == sorted(alone) and len(got) == len(set(got)) == len(keys)


def test_resume_mid_epoch_through_a_stateful_dataloader(tmp_path):
    """3 ranks x 2 workers on uneven data: stop rank r after k batches, restart from its state_dict:
    the remaining batches, in the same order, and the union equals an uninterrupted epoch."""
    from torchdata.stateful_dataloader import StatefulDataLoader
    uneven_folder(tmp_path, shards=9)
    def loader(rank):
        ds = LatentShardDataset(str(tmp_path), batch_size=2, seed=7, rank=rank, world_size=3, shuffle_buffer=4)
        return StatefulDataLoader(ds, batch_size=None, num_workers=2)
    for rank in range(3):
        full = [tuple(b["key"]) for b in loader(rank)]
        first = loader(rank)
        it, head = iter(first), []
        for _ in range(3):
            head.append(tuple(next(it)["key"]))
        state = first.state_dict()
        del it, first
        resumed = loader(rank)
        resumed.load_state_dict(state)
        tail = [tuple(b["key"]) for b in resumed]
        assert head + tail == full, f"rank {rank}"


def test_ranks_of_a_gloo_group_get_equal_batches_and_disjoint_rows(tmp_path):
    """Three processes in a real torch.distributed gloo group, two DataLoader workers each: every rank
    yields the same number of batches (no rank waits at the epoch's end), their rows are disjoint,
    and together they cover all but the rows that do not fill a batch on every rank."""
    keys = uneven_folder(tmp_path, shards=11)
    script = f"""
import os, sys, json, torch, torch.distributed as dist
from torch.utils.data import DataLoader
sys.path.insert(0, {ROOT!r})
from encoder_service.reader import LatentShardDataset
dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=3, init_method="tcp://127.0.0.1:" + sys.argv[2])
ds = LatentShardDataset({str(tmp_path)!r}, batch_size=2, seed=11)
keys = [k for b in DataLoader(ds, batch_size=None, num_workers=2) for k in b["key"]]
counts = [None] * 3
dist.all_gather_object(counts, len(keys) // 2)
print(json.dumps({{"count": counts, "keys": keys}}))
dist.destroy_process_group()
"""
    from services import free_port
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    import json
    results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    counts = results[0]["count"]
    assert counts == [counts[0]] * 3 and counts[0] > 0
    seen = [k for r in results for k in r["keys"]]
    assert len(seen) == len(set(seen)) and set(seen) <= keys
    assert len(keys) - len(seen) < 2 * 3 * len(SHAPES)  # per bucket, less than one batch on every rank


def test_opening_a_table_on_s3_costs_a_few_requests(s3_server):  # noqa: F811
    bucket = make_bucket(s3_server.storage, "reader")
    uneven_folder_s3 = f"{bucket}/t"
    g = torch.Generator().manual_seed(0)
    for group in range(3):  # three commits: the log the reader replays
        commit_rows(uneven_folder_s3, {f"s{group}{i}": [latent_row(f"s{group}{i}/v/0", m, m)] for i in range(20)
                                       for m in [torch.randn(16, 3, 4, 4, generator=g).bfloat16()]},
                    storage=s3_server.storage, run=RUN)
    before = s3_server.requests()
    ds = LatentShardDataset(uneven_folder_s3, storage=s3_server.storage, batch_size=4)
    opened = s3_server.requests() - before
    assert len(ds.files) == 60 and opened <= 20, opened
    assert sum(b["latent"].shape[0] for b in ds) == 60
