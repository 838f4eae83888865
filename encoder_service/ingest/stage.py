"""The ingest stage as Ray Data runs it: one CPU task per input shard, clips grouped into units
(ingest/units.py) and the shard's end row, as typed one-row tables. Nothing here imports torch or the
model: an ingest worker loads what ingest uses (numpy, PyAV/decord, pyarrow, fsspec)."""
import pyarrow as pa

from encoder_service import metrics
from encoder_service.ingest.clips import IngestConfig, IngestedClip, ShardUnavailable, ingest_shard
from encoder_service.ingest.units import UnitBuilder, UnitPlan
from encoder_service.records import LedgerRow, ShardEnd, StageRow, to_table
from encoder_service.storage import scrub


def ingest_shards(shards: pa.Table, cfg: IngestConfig, units: UnitPlan):
    """map_batches UDF (CPU tasks): each input row is one shard; yields one-row tables."""
    for url, shard_id in zip(shards["url"].to_pylist(), shards["shard_id"].to_pylist()):
        for row in shard_rows(url, shard_id, cfg, units):
            yield to_table([row], StageRow)


def shard_rows(url: str, shard_id: str, cfg: IngestConfig, plan: UnitPlan):
    """A shard's unit rows, then its end row. A shard that cannot be read, or a bug in ingest
    itself, is not data: the end row carries the failure and the shard is not committed."""
    builder, ledger, clips, failure = UnitBuilder(shard_id, plan), [], 0, None
    try:
        for item in ingest_shard(url, cfg):
            if isinstance(item, LedgerRow):
                ledger.append(item)
                continue
            _count_decoded(item)
            clips += 1
            yield from builder.add(item.clip, item.frames)
    except ShardUnavailable as exc:
        failure = scrub(str(exc))
    except Exception as exc:  # noqa: BLE001 - per-sample problems are handled inside; this is a bug
        failure = scrub(f"{url}: ingest failed ({type(exc).__name__}: {exc})")
    yield from builder.flush()
    yield StageRow("end", shard_id, end=ShardEnd(shard_id, url, builder.count, clips, ledger, failure))


def _count_decoded(item: IngestedClip) -> None:
    metrics.inc("wfvae_clips_decoded", bucket=item.clip.bucket)
    metrics.inc("wfvae_frames_decoded", item.frames.shape[0])
    metrics.observe("wfvae_decode_seconds", item.decode_seconds)
