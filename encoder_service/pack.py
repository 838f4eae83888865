"""`python -m encoder_service pack SRC OUT`: WebDataset shards from a folder of videos or a table.

SRC is a folder (every video under it, with an optional sidecar `name.txt` caption and/or
`name.json` metadata beside `name.mp4`) or a CSV / Parquet table with a path column (relative
paths are relative to the table) and optional caption and span columns (any other columns go into
the sample's JSON). Samples are written in sorted path order with webdataset.ShardWriter
(OUT/shard-000000.tar, ... locally or on s3://; --prefix names them, so that shards packed apart
can go into one output folder), member times fixed, so the same input gives the same bytes. Keys
are the paths without extension (dots in file names become "_": webdataset cuts keys at the first
dot). A file that is missing, unreadable, not a regular file (a dangling link, a FIFO), not a
video, whose key another file already has, or a table row whose spans cell is empty or not JSON,
is reported on stderr and not packed; the exit status is 1 if anything was. Nothing to pack (an
empty folder, a table with no rows) is a mistake: one line, exit 2, no shard written.
"""
import argparse
import json
import os
import posixpath
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from encoder_service.ingest.tar_stream import VIDEO_EXTS
from encoder_service.storage import StorageOptions, filesystem


@dataclass
class Entry:
    key: str
    video: str                       # local path
    caption: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Packed:
    samples: int = 0
    shards: list[str] = field(default_factory=list)
    bytes: int = 0
    reported: list[str] = field(default_factory=list)   # one line per file not packed


def entries_from_folder(src: Path, packed: Packed) -> list[Entry]:
    videos = sorted(p for p in src.rglob("*") if p.suffix.lower().lstrip(".") in VIDEO_EXTS and not p.is_dir())
    out = []
    for video in videos:
        problem = not_a_file(video)
        if problem:
            packed.reported.append(f"{video}: {problem}; not packed")
            continue
        entry = Entry(sample_key(video.relative_to(src)), str(video))
        caption, sidecar = video.with_suffix(".txt"), video.with_suffix(".json")
        try:
            if caption.exists():
                entry.caption = caption.read_text(encoding="utf-8").strip()
            if sidecar.exists():
                entry.meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            packed.reported.append(f"{video}: sidecar unreadable ({type(exc).__name__}: {exc}); not packed")
            continue
        out.append(entry)
    return out


def entries_from_table(src: Path, path_column: str, caption_column: str | None, spans_column: str | None,
                       packed: Packed) -> list[Entry]:
    import pyarrow.csv
    import pyarrow.parquet
    table = pyarrow.parquet.read_table(src) if src.suffix.lower() == ".parquet" else pyarrow.csv.read_csv(src)
    for name in (path_column, caption_column, spans_column):
        if name is not None and name not in table.column_names:
            raise PackError(f"{src}: no column {name!r} (columns: {', '.join(table.column_names)})")
    out = []
    for number, row in enumerate(table.to_pylist(), start=2):  # line 1 of a CSV is its header
        path = src.parent / str(row.pop(path_column))  # (an absolute path stays itself)
        relative = path.relative_to(src.parent) if path.is_relative_to(src.parent) else Path(path.name)
        entry = Entry(sample_key(relative), str(path))
        entry.caption = row.pop(caption_column, None) if caption_column else None
        if spans_column:
            spans = row.pop(spans_column)
            try:
                spans = json.loads(spans) if isinstance(spans, str) else spans
            except ValueError:
                spans = None
            if not spans or not isinstance(spans, list):
                packed.reported.append(f"{src} row {number} ({path}): its {spans_column} cell is empty or not "
                                       f"JSON [[start, end], ...]; not packed")
                continue
            entry.meta["clips"] = spans
        entry.meta.update({k: v for k, v in row.items() if v is not None})
        out.append(entry)
    return sorted(out, key=lambda e: e.key)


def not_a_file(path: Path) -> str | None:
    """Why `path` is not a regular file (without opening it: a FIFO would block), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a dangling link" if path.is_symlink() else "missing"
    except OSError as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None if stat.S_ISREG(mode) else "not a regular file (a FIFO, socket or device)"


class PackError(ValueError):
    """A mistake in the command (one line, exit 2)."""


def sample_key(relative: Path) -> str:
    stem = posixpath.join(*relative.parent.parts, relative.stem) if relative.parent.parts else relative.stem
    return stem.replace(".", "_")


def unpackable(path: str) -> str | None:
    """Why this file cannot be packed, or None."""
    from encoder_service.ingest.decoders import VideoError, probe
    problem = not_a_file(Path(path))
    if problem:
        return problem
    try:
        probe(path)
    except VideoError as exc:
        return f"not a readable video ({exc.reason})"
    except OSError as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def pack(entries: list[Entry], out: str, max_count: int, max_size: int, storage: StorageOptions | None,
         packed: Packed, progress: bool = True, prefix: str = "shard-") -> Packed:
    import webdataset
    from tqdm import tqdm
    fs, root = filesystem(out, storage)
    if fs.isfile(root):
        raise PackError(f"{out} is a file: give a folder for the shards")
    fs.makedirs(root, exist_ok=True)
    protocol = out.split("://")[0] + "://" if "://" in out else ""

    def opener(name: str):
        packed.shards.append(protocol + name if protocol else name)
        return fs.open(name, "wb")

    seen: dict[str, str] = {}
    with webdataset.ShardWriter(posixpath.join(root, f"{prefix}%06d.tar"), maxcount=max_count, maxsize=max_size,
                                opener=opener, verbose=0, mtime=0.0) as writer:
        for entry in tqdm(entries, desc="pack", unit="video", disable=not progress, file=sys.stderr):
            problem = unpackable(entry.video)
            if problem is None and entry.key in seen:
                problem = f"same key {entry.key!r} as {seen[entry.key]}; rename one of them"
            if problem:
                packed.reported.append(f"{entry.video}: {problem}; not packed")
                continue
            seen[entry.key] = entry.video
            writer.write(sample(entry))
            packed.samples += 1
    if not packed.samples:  # the writer opened its first shard before any sample came
        for shard in packed.shards:
            fs.rm(shard.removeprefix(protocol))
        packed.shards = []
    packed.bytes = sum(fs.size(s.removeprefix(protocol)) for s in packed.shards)
    return packed


def sample(entry: Entry) -> dict:
    ext = Path(entry.video).suffix.lower().lstrip(".")
    with open(entry.video, "rb") as f:
        data = {"__key__": entry.key, ext: f.read()}
    if entry.caption is not None:
        data["txt"] = entry.caption
    if entry.meta:
        data["json"] = json.dumps(entry.meta, sort_keys=True).encode()
    return data


def run(args) -> int:
    src = Path(args.src)
    packed = Packed()
    try:
        check_limits(args)
        if src.is_dir():
            entries = entries_from_folder(src, packed)
        elif src.suffix.lower() in (".csv", ".parquet"):
            entries = entries_from_table(src, args.path_column, args.caption_column, args.spans_column, packed)
        else:
            raise PackError(f"{src}: not a folder, a .csv or a .parquet table")
        if not entries and not packed.reported:
            raise PackError(f"{src}: no videos to pack ({'no rows' if not src.is_dir() else 'no video files'})")
        pack(entries, args.out, args.max_count, int(args.max_size_mb * 2 ** 20), StorageOptions(
            endpoint_url=args.s3_endpoint_url), packed, progress=not args.quiet, prefix=args.prefix)
    except (PackError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in packed.reported:
        print(line, file=sys.stderr)
    print(f"packed {packed.samples} videos into {len(packed.shards)} shards ({packed.bytes / 2 ** 20:.1f} MiB) "
          f"under {args.out}; {len(packed.reported)} not packed", flush=True)
    return 1 if packed.reported else 0


def check_limits(args) -> None:
    if args.max_count < 1:
        raise PackError(f"--max-count must be at least 1, got {args.max_count}")
    if not args.max_size_mb > 0:
        raise PackError(f"--max-size-mb must be positive, got {args.max_size_mb:g}")
    if not args.prefix or "/" in args.prefix or "%" in args.prefix or args.prefix.startswith("."):
        raise PackError(f"--prefix must be a file-name prefix (no '/', '%' or leading '.'), got {args.prefix!r}")


def add_parser(sub) -> None:
    p = sub.add_parser("pack", help="make WebDataset shards from a folder of videos or a CSV/Parquet table",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a folder of videos (sidecar name.txt / name.json), or a .csv / .parquet table")
    p.add_argument("out", help="the folder the shards go to (local or s3://): shard-000000.tar, ...")
    p.add_argument("--max-count", type=int, default=1000, help="videos per shard (default 1000)")
    p.add_argument("--max-size-mb", type=float, default=1024, help="MiB per shard (default 1024)")
    p.add_argument("--prefix", default="shard-", help="shard names: PREFIX000000.tar, ... (default shard-); "
                                                      "shards packed apart need their own prefixes to share a folder")
    p.add_argument("--path-column", default="path", help="table: the video path column (default path)")
    p.add_argument("--caption-column", help="table: a caption column (stored as the sample's txt)")
    p.add_argument("--spans-column", help="table: [[start, end], ...] per video (JSON text or a list), stored "
                                          "as the JSON's clips (for --clips-per-video spans)")
    p.add_argument("--s3-endpoint-url")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


__all__ = ["add_parser", "run"]
