"""Stream WebDataset samples out of a tar shard with bounded memory, losing nothing.

Members are read sequentially (tar stream mode over an fsspec file, so s3:// and local paths work
alike); video members are spooled to a temporary file in fixed-size blocks (decoders need a
seekable file) and deleted once the sample has been handled; json/txt members are small and kept
in memory (up to a cap). A sample is the run of consecutive members sharing a key (the member
name up to the first dot of its base name, as in WebDataset).

Nothing disappears silently: every member that is not used becomes a `Problem` (a link, a device
file, a second video in one sample), keys are escaped so any tar name can be stored, a key seen
again later in the shard is renamed `key#2`, `key#3`, ..., and a shard that ends inside a member
or a header is reported as truncated. A shard that cannot be read (cannot be opened, or the store
fails while streaming) raises ShardUnavailable: that is not a property of the data.
"""
import contextlib
import gzip
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field

from encoder_service.storage import StorageOptions, filesystem

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "ts")
META_EXTS = ("json", "txt")
SPOOL_BLOCK = 1 << 20
MAX_META_BYTES = 1 << 20


@dataclass
class Problem:
    """A member or a place in the shard that yields no sample: one ledger row each."""
    key: str          # sample key, or the member name for member-level problems
    reason: str
    message: str


@dataclass
class Sample:
    key: str                      # unique in the shard: base_key, or base_key#n for its n-th occurrence
    base_key: str = ""
    video_path: str | None = None
    video_member: str | None = None
    metadata: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)      # metadata problems (the sample is still used)
    problems: list[Problem] = field(default_factory=list)  # members of this sample that were not used


class ShardUnavailable(Exception):
    """The shard could not be read (missing, no access, the store failed): retry in a later run."""


class ShardTruncated(Exception):
    """The shard is not a tar, or ends inside a member or a header; `partial` is the sample being
    read then. A property of the data: the shard is committed with what came before."""

    def __init__(self, reason: str, message: str, partial: Sample | None):
        super().__init__(message)
        self.reason, self.partial = reason, partial


def safe_key(name: str) -> str:
    """Any tar member name as a storable, unambiguous key: bytes that are not UTF-8 (tarfile keeps
    them as surrogates) and the characters % and # are written %XX. Injective, so keys never merge,
    and '#' is free for duplicate numbering."""
    raw = name.encode("utf-8", "surrogateescape")
    out, i = [], 0
    while i < len(raw):
        for size in (1, 2, 3, 4):
            try:
                char = raw[i:i + size].decode("utf-8")
                break
            except UnicodeDecodeError:
                char = None
        if char is None or char in "%#":
            out.append(f"%{raw[i]:02X}")
            i += 1
        else:
            out.append(char)
            i += size
    return "".join(out)


def split_key(name: str) -> tuple[str, str]:
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def shard_id_of(url: str) -> str:
    """The shard's name: its file name without the tar suffix (and without a URL's query string)."""
    if "://" in url and not url.startswith(("s3://", "s3a://", "file://")):
        url = url.split("?", 1)[0]
    base = posixpath.basename(url.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar"):  # (gzipped shards are read as a stream by tarfile "r|*")
        if base.endswith(suffix):
            return base[:-len(suffix)]
    return base


class _HeaderWatch(tarfile.TarInfo):
    """Records why tarfile stopped reading headers: it ends iteration silently on a truncated or
    garbled header, which would drop every later member without a word."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise  # the end-of-archive marker: a proper end
        except tarfile.HeaderError as exc:
            tar.header_problem = f"{type(exc).__name__}: {exc}"
            raise


def _uncompressed(handle):
    """The tar bytes of a shard: gzip (.tar.gz, .tgz: recognised by its magic number) is read through
    GzipFile, which reads every member of a multi-member file (`cat a.gz b.gz`, bgzip) and checks
    each member's CRC; tarfile's own stream mode stops after the first member."""
    magic = handle.read(2)
    handle.seek(0)
    return gzip.GzipFile(fileobj=handle, mode="rb") if magic == b"\x1f\x8b" else contextlib.nullcontext(handle)


def iter_samples(url: str, storage: StorageOptions | None = None, spool_dir: str | None = None):
    """Yield Samples (and Problems for members outside any usable sample) in shard order. Spool
    files live until the consumer asks for the next item.

    Raises ShardUnavailable when the shard cannot be opened or read, ShardTruncated (after
    yielding everything before the cut) when it ends inside a member or a header."""
    try:
        fs, path = filesystem(url, storage)
        handle = fs.open(path, "rb", block_size=8 << 20)
    except Exception as exc:  # noqa: BLE001 - every way of failing to open is reported the same way
        raise ShardUnavailable(f"{url}: cannot be opened ({type(exc).__name__}: {exc}); check the URL and "
                               "credentials; the shard is retried by the next run") from exc
    spool = tempfile.mkdtemp(prefix="wfvae-spool-", dir=spool_dir)
    current, seen, started, header_problem = None, {}, False, None
    try:
        with handle, _uncompressed(handle) as stream, tarfile.open(fileobj=stream, mode="r|",
                                                                  tarinfo=_HeaderWatch) as tar:
            started = True
            for member in tar:
                if member.isdir():
                    continue
                key, ext = split_key(safe_key(member.name))
                if current is not None and key != current.base_key:
                    yield current
                    _discard(current)
                    current = None
                if not member.isfile():
                    yield Problem(safe_key(member.name), "link_member" if member.islnk() or member.issym()
                                  else "not_a_file", f"{url}:{safe_key(member.name)}: a {_kind(member)} member, "
                                  "not a file; store the file itself")
                    continue
                if current is None:
                    seen[key] = seen.get(key, 0) + 1
                    current = Sample(key if seen[key] == 1 else f"{key}#{seen[key]}", base_key=key)
                    if seen[key] > 1:
                        yield _split_sample(url, current.key, key)
                _take_member(tar, member, ext, current, spool, url)
            header_problem = getattr(tar, "header_problem", None)
        if current is not None:  # complete: the problem, if any, is in a later header
            yield current
            last, current = current.key, None
        else:
            last = "(start)"
        if header_problem:
            raise ShardTruncated("truncated_shard", f"{url}: the tar breaks after sample {last} (unreadable header: "
                                 f"{header_problem}); later members are lost: re-upload the shard", None)
    except (gzip.BadGzipFile, zlib.error) as exc:  # a CRC or data error inside the gzip stream: the data's
        after = current.key if current else "(start)"
        raise ShardTruncated("corrupt_gzip", f"{url}: the gzip stream is damaged inside sample {after} ({exc}); "
                             "later members are lost: re-upload the shard", current) from exc
    except (tarfile.TarError, EOFError) as exc:
        if not started:
            raise ShardTruncated("not_a_tar", f"{url}: not a tar archive ({exc}); WebDataset shards are tar "
                                 "files", None) from exc
        after = current.key if current else "(start)"
        raise ShardTruncated("truncated_shard", f"{url}: the tar ends or breaks inside sample {after} ({exc}); "
                             "later members are lost: re-upload the shard", current) from exc
    except OSError as exc:
        raise ShardUnavailable(f"{url}: reading failed ({type(exc).__name__}: {exc}); the shard is "
                               "retried by the next run") from exc
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _split_sample(url: str, key: str, base: str) -> Problem:
    return Problem(key, "unsorted_tar", f"{url}:{base}: members of sample {base} are not next to each other "
                   f"(more of them follow other samples), so they form a separate sample {key}, as webdataset "
                   "groups them too; the tar was not written in name order: repack it with `tar --sort=name` "
                   "or `python -m encoder_service pack`")


def _kind(member: tarfile.TarInfo) -> str:
    return {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
            tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}.get(member.type, f"type {member.type!r}")


def _take_member(tar, member, ext, sample: Sample, spool: str, url: str) -> None:
    source = tar.extractfile(member)
    name = safe_key(member.name)
    ext = ext.rpartition(".")[2]  # "video.mp4" is a video too
    if ext in VIDEO_EXTS and sample.video_path is not None:
        sample.problems.append(Problem(name, "extra_video_member", f"{url}:{name}: a second video in sample "
                                       f"{sample.key} ({sample.video_member} is used); give each video its own key"))
    elif ext in VIDEO_EXTS:
        fd, target = tempfile.mkstemp(suffix="." + ext, dir=spool)  # (decoders probe the content)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, SPOOL_BLOCK)
        if os.path.getsize(target) != member.size:
            raise EOFError(f"member {name} ends early")
        sample.video_path, sample.video_member = target, name
    elif ext in META_EXTS:
        _take_metadata(source, member, ext, sample, name)


def _take_metadata(source, member, ext, sample: Sample, name: str) -> None:
    if member.size > MAX_META_BYTES:
        sample.notes.append(f"{name}: {member.size} bytes of metadata, over the 1 MiB cap; ignored")
        return
    text = source.read().decode("utf-8", errors="replace")
    if ext == "txt":
        sample.metadata["txt"] = text
        return
    try:
        sample.metadata["json"] = json.loads(text)
    except (ValueError, RecursionError) as exc:  # invalid, or nested deeper than Python recurses
        sample.metadata["json_raw"] = text
        sample.notes.append(f"{name}: not usable JSON ({type(exc).__name__}); kept as json_raw")


def _discard(sample: Sample) -> None:
    if sample.video_path and os.path.exists(sample.video_path):
        os.unlink(sample.video_path)
