"""Every record the service passes or stores, each defined once as a dataclass; the Arrow schema
of each is derived from its fields here, and so is the conversion to and from Arrow rows.

    Clip        ingest -> encode -> Parquet: a clip's identity and provenance (no pixels)
    LatentRow   a Parquet row of {output}/latents: the Clip, the latents, the run's identity
    LedgerRow   a Parquet row of {output}/errors: one sample or clip that yields no latent
    Unit        ingest -> encode: the clips (and their pixels) of one encoder call, one shard
    ShardEnd    ingest -> encode -> driver: a shard's totals, its ingest ledger, or why it failed
    DataFile    a written Parquet file: name, rows, bytes, sha256
    QaRow       one quality-checked clip: drift against an fp32 encode, reconstruction PSNR/SSIM
    UnitResult  encode -> driver: what one encoder call wrote (never the latents themselves)
    StageRow    the one row type of each stream between Ray stages (a unit, a result or an end)

The output folder's bookkeeping (table/layout.py), stored in its Delta tables:
    InputIdentity  what the input shard's store said of it when it was planned
    RunMeta        which VAE, weights, precision and settings made the latents
    ShardStats     per-channel sums of a shard's latent means and logvars
    QaSummary      a mergeable summary of QA rows (counts, sums, maxima, log-histograms)
    ShardRecord    a committed shard: one row of the shards table (its files, ledger, counts, statistics, QA)
    FolderTotals   totals over shards, merged one shard at a time (_summary.json, inspect, drift)
"""
import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Clip:
    key: str                      # {shard_id}/{sample_key}/{clip_index}, unique and stable across runs
    source_url: str
    source_key: str
    clip_index: int
    frame_indices: list[int]
    src_fps: float
    clip_fps: float
    src_hw: list[int]             # displayed height, width of the source (rotation applied)
    rotation: int                 # counter-clockwise degrees the stored frames were turned to display
    crop_box: list[int]           # top, left, height, width in the resized, displayed frame
    bucket: str                   # TxHxW
    metadata: str                 # pass-through sample metadata (caption, json) as JSON
    span: list[float] | None      # --clips-per-video spans: the span's [start, end] seconds, else null
    caption: str | None           # the span's caption (--captions-field), else null


@dataclass(frozen=True)
class LatentRow(Clip):
    mean: bytes                   # raw little-endian bytes of latent_dtype, shape latent_shape
    logvar: bytes | None          # null when the run stores no logvar
    latent_shape: list[int]       # C, t, h, w
    latent_dtype: str             # bfloat16 | float16 | float32
    vae_name: str
    vae_sha256: str
    scale: list[float]
    shift: list[float]
    precision: str                # the precision policy's label
    pipeline_version: str
    text_embedding: bytes | None = None         # the caption's text-encoder hidden states, raw little-endian
    text_embedding_shape: list[int] | None = None   # (text_tokens, d_model)
    text_embedding_dtype: str | None = None     # bfloat16 | float32
    text_tokens: int | None = None              # the caption's tokens (unpadded, after truncation)


@dataclass(frozen=True)
class LedgerRow:
    key: str                      # sample (or clip, or member) that yields no latent
    source_url: str
    stage: str                    # read | probe | decode | sample | encode
    reason: str                   # short machine-groupable reason, e.g. "too_short"
    message: str                  # the human sentence: what and what to do


@dataclass(frozen=True)
class Unit:
    shard_id: str
    index: int                    # position in the shard's sequence of units (deterministic)
    shape: list[int]              # T, H, W, 3 of every clip
    clips: list[Clip]
    frames: bytes                 # the clips' uint8 frames, back to back


@dataclass(frozen=True)
class ShardEnd:
    shard_id: str
    source_url: str
    units: int
    clips: int
    ledger: list[LedgerRow]       # ingest's rows (samples, members, the shard itself)
    failure: str | None = None    # set: the shard could not be read; it is not committed


@dataclass(frozen=True)
class DataFile:
    name: str                     # relative to the output folder
    rows: int
    bytes: int
    sha256: str
    first_key: str = ""           # the smallest and largest key it holds (rows are sorted by key): the
    last_key: str = ""            # min/max statistics of its Delta add action
    bucket: str = ""              # the clips' bucket (TxHxW): a data file holds one unit, clips of one shape


@dataclass(frozen=True)
class ChannelStats:
    """Sums over every latent element of a set of clips, per channel (merge by adding)."""
    count: list[int]
    sum: list[float]
    sum_sq: list[float]


@dataclass(frozen=True)
class QaRow:
    key: str
    drift_mean: float             # relative L2 of the stored mean against an fp32 (TF32 off) encode
    drift_logvar: float           # the same for logvar
    psnr: float                   # the stored mean decoded (fp32, causal-cache chunks) against the clip, dB
    ssim: float


@dataclass(frozen=True)
class Sketch:
    """A mergeable summary of non-negative values: count, sum, max and a log-spaced histogram
    (table/totals.py: SKETCH_BINS_PER_DECADE bins per decade) for quantiles."""
    count: int = 0
    total: float = 0.0
    max: float = 0.0
    bins: list[int] = dataclasses.field(default_factory=list)      # histogram bin indexes ...
    counts: list[int] = dataclasses.field(default_factory=list)    # ... and their counts, sorted by index


@dataclass(frozen=True)
class QaSummary:
    clips: int = 0
    drift_mean: Sketch = dataclasses.field(default_factory=Sketch)
    drift_logvar: Sketch = dataclasses.field(default_factory=Sketch)
    psnr_sum: float = 0.0         # over finite PSNRs (identical reconstructions give inf)
    psnr_finite: int = 0
    ssim_sum: float = 0.0


@dataclass(frozen=True)
class UnitResult:
    shard_id: str
    index: int
    clips: int
    file: DataFile | None         # None when no clip of the unit gave a latent
    ledger: list[LedgerRow]       # clips the encoder refused or that gave NaN/inf
    encode_seconds: float
    failure: str | None = None    # set: a fault (not the input) persisted; the shard is not committed
    mean_stats: ChannelStats | None = None
    logvar_stats: ChannelStats | None = None
    qa: list[QaRow] = dataclasses.field(default_factory=list)
    compile_seconds: float = 0.0  # torch.compile of new shapes during this unit (--compile)
    text_seconds: float = 0.0     # the text encoder's time on this unit's captions (--text-encoder)
    captions_missing: int = 0     # latent rows without a caption (no text embedding)
    started_at: float | None = None  # wall clock (epoch s) as the unit's first model call began


@dataclass(frozen=True)
class InputIdentity:
    size: int
    tag: str                      # ETag on S3, mtime in ns on local disk (what the listing reports)
    sha256: str | None = None     # the content's hash, with --input-identity sha256


@dataclass(frozen=True)
class RunMeta:
    vae_name: str
    vae_sha256: str
    precision: str                # the precision policy's label
    pipeline_version: str
    scale: list[float]
    shift: list[float]
    settings: str = ""            # the folder settings' fingerprint


@dataclass(frozen=True)
class ShardStats:
    mean: ChannelStats | None = None
    logvar: ChannelStats | None = None


@dataclass(frozen=True)
class ShardRecord:
    """A committed shard, one row of the output folder's shards table (table/log.py): what it was made
    from and with, what it holds, and its ledger. Committed right after the latents commit `commit`
    that added its files; a shard's current record is its row with the largest `commit`."""
    shard_id: str
    source_url: str               # credentials scrubbed
    settings: str                 # the fingerprint of the latent-affecting settings
    input: InputIdentity | None   # None in folders migrated from schema 2
    checkpoint_sha256: str
    clips: int
    latents: int
    ledger_reasons: dict[str, int]   # "stage/reason" -> rows
    non_finite_rejected: int
    file_bytes: int
    stats: ShardStats
    qa: QaSummary
    files: list[DataFile]         # its latent data files: exactly the latents table's files of this shard
    ledger: list[LedgerRow]       # the samples and clips of the shard that gave no latent
    qa_rows: list[QaRow]          # its quality-checked clips (qa summarises them)
    commit: int = -1              # the latents table version that added its files


@dataclass
class FolderTotals:
    shards: int = 0
    clips: int = 0
    latents: int = 0
    ledger_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    non_finite_rejected: int = 0
    file_bytes: int = 0
    checkpoints: list[str] = dataclasses.field(default_factory=list)
    stats: ShardStats = dataclasses.field(default_factory=ShardStats)
    qa: QaSummary = dataclasses.field(default_factory=QaSummary)


@dataclass
class RunRecord:
    """One invocation, as stored in _runs/<time>-<run>.json and as _summary.json's "last_run"
    (job/run.py makes it, job/summary.py writes it)."""
    inputs: list                          # the --input patterns as given
    shards_done: int                      # committed by this run
    shards_skipped: int                   # already complete
    shards_by_reason: dict                # why each planned shard was (re)done or skipped: reason -> count
    shards_failed: int
    failed_shards: dict                   # shard id -> reason (uncommitted: the next run redoes them)
    clips: int
    latents: int
    errors: int                           # ledger rows of the committed shards
    errors_by_reason: dict                # "stage/reason" -> rows
    seconds: float                        # from the job's start (planning and Ray's start-up included)
    clips_per_s: float                    # latents / seconds
    clips_per_s_encoding: float | None    # from the first model call of any unit
    startup_seconds: float | None         # the job's start to the first model call
    encoder_busy_fraction: float | None   # device seconds / (actors x seconds since the first model call)
    compile_seconds: float
    text_seconds_per_clip: float | None
    captions_missing: int
    driver_bytes_received: int
    settings: dict                        # the folder's settings (table description)
    run: dict                             # RunMeta: model, checkpoint sha256, precision, pipeline version
    config: dict                          # the options as the config file spells them
    quality: dict                         # latent statistics, drift against the folder's history, QA
    interrupted: bool                     # stopped by SIGTERM/SIGINT
    shards_left_for_next_run: int
    table: dict                           # versions, checkpoint and vacuum at the end


@dataclass(frozen=True)
class StageRow:
    kind: str                     # unit | end | result
    shard_id: str
    unit: Unit | None = None
    end: ShardEnd | None = None
    result: UnitResult | None = None


# ---- Arrow, derived from the fields ---------------------------------------------------------
_SCALARS = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(), bytes: pa.large_binary()}


def _arrow_type(hint) -> tuple[pa.DataType, bool]:
    """(Arrow type, nullable) of a field annotation."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return _arrow_type(inner[0])[0], True
    if typing.get_origin(hint) is list:
        return pa.list_(_arrow_type(args[0])[0]), False
    if typing.get_origin(hint) is dict:
        return pa.map_(_arrow_type(args[0])[0], _arrow_type(args[1])[0]), False
    if dataclasses.is_dataclass(hint):
        return pa.struct(_fields(hint)), False
    return _SCALARS[hint], False


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _fields(cls) -> list[pa.Field]:
    hints = _hints(cls)
    return [pa.field(f.name, *_arrow_type(hints[f.name])) for f in dataclasses.fields(cls)]


def schema(cls, metadata: dict | None = None) -> pa.Schema:
    return pa.schema(_fields(cls), metadata=metadata)


def to_table(rows: list, cls, metadata: dict | None = None) -> pa.Table:
    return pa.Table.from_pylist([dataclasses.asdict(r) for r in rows], schema=schema(cls, metadata))


def from_dict(cls, data: dict | None):
    """A dataclass instance (nested ones too) from its Arrow row form."""
    if data is None:
        return None
    hints = _hints(cls)
    return cls(**{f.name: _value(hints[f.name], data[f.name]) for f in dataclasses.fields(cls)})


def _value(hint, value):
    if value is None:
        return None
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _value(next(a for a in args if a is not type(None)), value)
    if typing.get_origin(hint) is list:
        return [_value(args[0], v) for v in value]
    if typing.get_origin(hint) is dict:  # Arrow maps come back as (key, value) pairs
        return {k: _value(args[1], v) for k, v in (value.items() if isinstance(value, dict) else value)}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    return value


def from_table(table: pa.Table, cls) -> list:
    return [from_dict(cls, row) for row in table.to_pylist()]


def to_json(record) -> bytes:
    """A record as the JSON the output folder stores (sorted keys: the same record, the same bytes)."""
    return json.dumps(dataclasses.asdict(record), indent=1, sort_keys=True).encode()


def from_json(cls, data: bytes | str):
    return from_dict(cls, json.loads(data))


__all__ = ["ChannelStats", "Clip", "DataFile", "FolderTotals", "InputIdentity", "LatentRow", "LedgerRow",
           "QaRow", "QaSummary", "RunMeta", "ShardEnd", "ShardRecord", "ShardStats", "Sketch", "StageRow", "Unit",
           "UnitResult", "from_dict", "from_json", "from_table", "schema", "to_json", "to_table"]
