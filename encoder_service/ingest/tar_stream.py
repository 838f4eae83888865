"""Stream WebDataset samples out of a tar shard with bounded memory.

Members are read sequentially (tar stream mode over an fsspec file, so s3:// and local paths work
alike); video members are spooled to a temporary file in fixed-size blocks (decoders need a
seekable file) and deleted once the sample has been handled; json/txt members are small and kept
in memory (up to a cap). A sample is the run of consecutive members sharing a key (the member
name up to the first dot of its base name, as in WebDataset).
"""
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field

from encoder_service.storage import StorageOptions, filesystem

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
META_EXTS = ("json", "txt")
SPOOL_BLOCK = 1 << 20
MAX_META_BYTES = 1 << 20


@dataclass
class Sample:
    key: str
    video_path: str | None = None
    video_member: str | None = None
    metadata: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class ShardReadError(Exception):
    """The shard itself failed (cannot be opened, or is truncated); samples before it were yielded."""

    def __init__(self, reason: str, message: str, partial: Sample | None = None):
        super().__init__(message)
        self.reason, self.partial = reason, partial


def split_key(name: str) -> tuple[str, str]:
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def shard_id_of(url: str) -> str:
    base = posixpath.basename(url.rstrip("/"))
    return base[:-4] if base.endswith(".tar") else base


def iter_samples(url: str, storage: StorageOptions | None = None, spool_dir: str | None = None):
    """Yield Samples in shard order. Spool files live until the consumer asks for the next sample.

    Raises ShardReadError (after yielding every complete sample before the problem) when the shard
    cannot be opened or ends in the middle of a member.
    """
    try:
        fs, path = filesystem(url, storage)
        handle = fs.open(path, "rb", block_size=8 << 20)
    except Exception as exc:  # noqa: BLE001 - every way of failing to open is reported the same way
        raise ShardReadError("unreadable_shard", f"{url}: cannot be opened ({exc}); check the URL and credentials")
    spool = tempfile.mkdtemp(prefix="wfvae-spool-", dir=spool_dir)
    current = None
    try:
        with handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if current is not None and key != current.key:
                    yield current
                    _discard(current)
                    current = None
                current = current or Sample(key)
                _take_member(tar, member, ext, current, spool)
        if current is not None:
            yield current
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardReadError("truncated_shard", f"{url}: unreadable after sample "
                             f"{current.key if current else '(start)'} ({exc}); re-upload the shard",
                             partial=current) from exc
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _take_member(tar, member, ext, sample: Sample, spool: str) -> None:
    source = tar.extractfile(member)
    if ext in VIDEO_EXTS and sample.video_path is None:
        fd, target = tempfile.mkstemp(suffix="." + ext, dir=spool)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, SPOOL_BLOCK)
        if os.path.getsize(target) != member.size:
            raise EOFError(f"member {member.name} ends early")
        sample.video_path, sample.video_member = target, member.name
    elif ext in META_EXTS:
        if member.size > MAX_META_BYTES:
            sample.problems.append(f"{member.name}: {member.size} bytes of metadata, over the 1 MiB cap; ignored")
            return
        text = source.read().decode("utf-8", errors="replace")
        if ext == "json":
            try:
                sample.metadata["json"] = json.loads(text)
            except json.JSONDecodeError:
                sample.metadata["json_raw"] = text
        else:
            sample.metadata["txt"] = text


def _discard(sample: Sample) -> None:
    if sample.video_path and os.path.exists(sample.video_path):
        os.unlink(sample.video_path)
