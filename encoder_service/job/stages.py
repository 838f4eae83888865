"""The two distributed stages and the row format between them.

Rows travel as Arrow tables with fixed schemas: `record` is the clip record's provenance (or an
error, or a shard-end marker) as JSON, pixels and latents are raw bytes. Fixed schemas keep blocks
of clips, errors and markers concatenable, and bytes keep uint8 frames uint8 in the object store.
"""
import json
import os
import time

import numpy as np
import pyarrow as pa

from encoder_service import metrics
from encoder_service.ingest.clips import IngestConfig, error_record, ingest_shard
from encoder_service.shards.schema import dtype_name, encode_tensor

INGEST_SCHEMA = pa.schema([("kind", pa.string()), ("shard_id", pa.string()), ("key", pa.string()),
                           ("record", pa.string()), ("frames", pa.large_binary())])
ENCODED_SCHEMA = pa.schema([("kind", pa.string()), ("shard_id", pa.string()), ("key", pa.string()),
                            ("record", pa.string()), ("mean", pa.large_binary()), ("logvar", pa.large_binary())])


def _table(rows, schema):
    return pa.Table.from_pylist(rows, schema=schema)


def ingest_shards(shards: pa.Table, cfg: IngestConfig, batch_size: int):
    """map_batches UDF (CPU tasks): each input row is one shard.

    Yields one block per encoder batch: `batch_size` clips of one shard and one shape, in shard
    order. The encoder takes each block as it is, so which clips share a batch depends only on the
    shard, and a shard encoded again (alone or beside others) gives the same bytes. Error rows and
    the shard's end marker (its clip count) come last.
    """
    for url, shard_id in zip(shards["url"].to_pylist(), shards["shard_id"].to_pylist()):
        by_shape, errors, clips = {}, [], 0
        try:
            for kind, record in ingest_shard(url, cfg):
                if kind == "error":
                    errors.append(_row("error", shard_id, record))
                    continue
                frames = record.pop("frames")
                record["shape"] = list(frames.shape)
                metrics.inc("wfvae_clips_decoded", bucket=record["bucket"])
                metrics.inc("wfvae_frames_decoded", frames.shape[0])
                metrics.observe("wfvae_decode_seconds", record["decode_s"])
                clips += 1
                group = by_shape.setdefault(frames.shape, [])
                group.append(_row("clip", shard_id, record, frames.tobytes()))
                if len(group) == batch_size:
                    yield _table(group, INGEST_SCHEMA)
                    group.clear()
        except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen input must not kill the job
            errors.append(_row("error", shard_id, error_record(shard_id, url, "ingest", "internal_error",
                                                               f"{url}: {type(exc).__name__}: {exc}")))
        for group in by_shape.values():
            if group:
                yield _table(group, INGEST_SCHEMA)
        end = {"key": shard_id, "clips": clips, "errors": len(errors), "url": url}
        yield _table(errors + [_row("end", shard_id, end)], INGEST_SCHEMA)


def _row(kind, shard_id, record, frames=b""):
    return {"kind": kind, "shard_id": shard_id, "key": record["key"], "record": json.dumps(record), "frames": frames}


class EncodeClips:
    """map_batches UDF for the actor pool: loads the LatentEncoder once, encodes each block's clips
    (one batch, see ingest_shards), passes error and end rows through. Non-finite latents become
    errors."""

    def __init__(self, checkpoint, model_config, precision, device, batch_size, chunk_frames, store_logvar,
                 inject_fault=None):
        from encoder_service.engine import LatentEncoder
        self.encoder = LatentEncoder.load(checkpoint, model_config, precision, device, chunk_frames)
        self.batch_size, self.store_logvar, self.fault, self.calls = batch_size, store_logvar, inject_fault, 0
        self.last_return = None  # end of the previous call: the gap to the next is time spent waiting for input

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.last_return is not None:
            metrics.inc("wfvae_encoder_wait_seconds", time.perf_counter() - self.last_return)
        self._maybe_fail()
        try:
            return self._encode_block(batch)
        finally:
            self.last_return = time.perf_counter()

    def _encode_block(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        clips = [r for r in rows if r["kind"] == "clip"]
        out = [{**_drop_frames(r), "mean": b"", "logvar": b""} for r in rows if r["kind"] != "clip"]
        by_shape = {}
        for r in clips:
            by_shape.setdefault(tuple(json.loads(r["record"])["shape"]), []).append(r)
        for shape, group in by_shape.items():
            for i in range(0, len(group), self.batch_size):
                out += self._encode(group[i:i + self.batch_size], shape)
        return _table(out, ENCODED_SCHEMA)

    def _encode(self, rows, shape):
        frames = np.stack([np.frombuffer(r["frames"], np.uint8).reshape(shape) for r in rows])
        if self.fault and self.fault.startswith("nan:"):
            frames = frames.astype(np.float32)
            for i, r in enumerate(rows):
                if self.fault[4:] in r["key"]:
                    frames[i] = np.nan
        start = time.perf_counter()
        try:
            result = self.encoder.encode(frames)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory on one batch: record, go on
            return [self._error(r, "encode_failed", f"{type(exc).__name__}: {exc}") for r in rows]
        busy = time.perf_counter() - start
        share = busy / len(rows)  # encoder-busy seconds per clip, for the run summary's busy fraction
        self._report(busy, len(rows), shape[0])
        out = []
        for i, r in enumerate(rows):
            if not bool(result.finite[i]):
                out.append(self._error(r, "non_finite_latent", "the encoder produced NaN/inf latents; the clip "
                                       "was not written (check the source video and the checkpoint)"))
                continue
            record = {**json.loads(r["record"]), "latent_shape": list(result.mean.shape[1:]),
                      "latent_dtype": dtype_name(result.mean.dtype), "encode_s": share}
            out.append({"kind": "latent", "shard_id": r["shard_id"], "key": r["key"], "record": json.dumps(record),
                        "mean": encode_tensor(result.mean[i]),
                        "logvar": encode_tensor(result.logvar[i]) if self.store_logvar else b""})
        return out

    def _report(self, busy, clips, frames_per_clip):
        metrics.inc("wfvae_encoder_busy_seconds", busy)
        metrics.observe("wfvae_encode_seconds", busy)
        metrics.inc("wfvae_clips_encoded", clips)
        metrics.inc("wfvae_frames_encoded", clips * frames_per_clip)
        in_use, peak = metrics.device_memory(self.encoder.device)
        metrics.set_gauge("wfvae_encoder_memory_bytes", in_use, device=str(self.encoder.device))
        metrics.set_gauge("wfvae_encoder_memory_peak_bytes", peak, device=str(self.encoder.device))

    def _error(self, row, reason, message):
        rec = json.loads(row["record"])
        err = error_record(row["key"], rec.get("source_url", ""), "encode", reason, f"{row['key']}: {message}")
        return {"kind": "error", "shard_id": row["shard_id"], "key": row["key"], "record": json.dumps(err),
                "mean": b"", "logvar": b""}

    def _maybe_fail(self):
        """Test-only fault injection: kill this actor process once, after N calls."""
        self.calls += 1
        if self.fault and self.fault.startswith("kill-actor-after:"):
            _, n, marker = self.fault.split(":", 2)
            if self.calls > int(n) and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)


def _drop_frames(row):
    return {k: v for k, v in row.items() if k != "frames"}
