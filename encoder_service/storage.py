"""Storage access for local paths, s3:// and any fsspec URL, with retries for flaky object stores."""
import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec


@dataclass(frozen=True)
class StorageOptions:
    """How to reach the object store. `endpoint_url` points s3:// at an S3-compatible server.
    Every request has a connect and a read timeout and at most `attempts` tries (botocore's
    adaptive retries, exponential backoff), so a store that hangs fails within a bound:
    attempts x (connect + read timeout) plus the backoff."""
    endpoint_url: str | None = None
    extra: dict = field(default_factory=dict)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    attempts: int = 5

    def for_url(self, url: str) -> dict:
        if not url.startswith(("s3://", "s3a://")):
            return dict(self.extra)
        config = {"connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s,
                  "retries": {"max_attempts": self.attempts, "mode": "adaptive"}}
        opts = {"config_kwargs": config, **self.extra}
        if self.endpoint_url:
            opts["client_kwargs"] = {**opts.get("client_kwargs", {}), "endpoint_url": self.endpoint_url}
        return opts

    def for_delta(self, url: str) -> dict[str, str] | None:
        """The same store as delta-rs (object_store) options: endpoint, credentials, timeouts, retries.
        Credentials not given here come from the environment, as for s3fs."""
        if not url.startswith(("s3://", "s3a://")):
            return None
        opts = {"timeout": f"{self.read_timeout_s:g}s", "connect_timeout": f"{self.connect_timeout_s:g}s",
                "max_retries": str(self.attempts)}
        if not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
            opts["AWS_REGION"] = "us-east-1"
        if self.endpoint_url:
            opts["AWS_ENDPOINT_URL"] = self.endpoint_url
            opts["AWS_ALLOW_HTTP"] = str(self.endpoint_url.startswith("http://")).lower()
        for ours, theirs in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"),
                             ("token", "AWS_SESSION_TOKEN")):
            if self.extra.get(ours):
                opts[theirs] = str(self.extra[ours])
        return opts


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+(:[^/\s@]*)?@")
_SIGNED = re.compile(r"(?i)(?<=[?&;])(X-Amz-(?:Credential|Signature|Security-Token)|X-Goog-(?:Credential|Signature)|"
                     r"AWSAccessKeyId|Signature|sig|token|access_token|refresh_token|id_token|api[-_]?key|key|"
                     r"password|passwd|pwd|secret|client_secret|auth|authorization|credential|session)"
                     r"=[^&\s\"']+")


def scrub(text: str) -> str:
    """The text with credentials in URLs (user:password@, signed-URL parameters) replaced by ***."""
    return _SIGNED.sub(r"\1=***", _USERINFO.sub(r"\1***@", text))


def filesystem(url: str, options: StorageOptions | None = None):
    """(fsspec filesystem, path inside it) for a URL or local path."""
    fs, path = fsspec.core.url_to_fs(url, **(options or StorageOptions()).for_url(url))
    if is_s3(fs):
        fs.retries = 1  # s3fs would retry botocore's retries 5 times over: the bound is StorageOptions'
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def glob_urls(url: str, options: StorageOptions | None = None) -> list[str]:
    """Sorted URLs matching a glob pattern, with the protocol (s3:// ...) that fsspec strips put back."""
    fs, path = filesystem(url, options)
    protocol = url.split("://")[0] + "://" if "://" in url else ""
    return [protocol + m if protocol and not m.startswith(protocol) else m for m in sorted(fs.glob(path))]


def sha256_of(fs, path: str, block: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def retry(fn, *, attempts: int = 2, base_delay: float = 0.5):
    """Call fn() until it succeeds, backing off exponentially on OSError; the last failure is
    raised. A missing file is an answer, not a failure. (On S3 botocore already retries each
    request StorageOptions.attempts times within its timeouts: this is one more try on top.)"""
    for attempt in range(attempts - 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError:
            time.sleep(base_delay * 2 ** attempt)
    return fn()


# ---- listings and atomic creation, for bookkeeping at the size users run ---------------------
@dataclass(frozen=True)
class Listed:
    """One object of a listing: its name inside the listed folder and what the store says of it."""
    name: str
    size: int
    tag: str           # the store's version of the object: ETag on S3, mtime in ns on local disk


LIST_PAGE = 1000  # S3's page size: one request per 1,000 keys


def is_s3(fs) -> bool:
    return any(p in ("s3", "s3a") for p in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)))


def list_prefix(fs, folder: str, name_prefix: str = "") -> Iterator[Listed]:
    """The files directly in `folder` whose names start with `name_prefix`, page by page: on S3 one
    request per 1,000 keys (the prefix is filtered by the server), locally one directory scan; never
    a request per file. A missing folder lists nothing."""
    folder = folder.rstrip("/")
    if is_local(fs):
        yield from _list_local(fs._strip_protocol(folder), name_prefix)
    elif is_s3(fs):
        yield from _list_s3(fs, folder, name_prefix)
    else:
        try:
            entries = fs.ls(folder, detail=True)
        except FileNotFoundError:
            return
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") == "file" and name.startswith(name_prefix):
                stamp = e.get("ETag") or e.get("etag") or e.get("mtime") or e.get("LastModified") or e.get("created")
                yield Listed(name, int(e.get("size") or 0), str(stamp))


def _list_local(folder: str, name_prefix: str) -> Iterator[Listed]:
    try:
        scan = os.scandir(folder)
    except FileNotFoundError:
        return
    with scan:
        for entry in scan:
            if entry.name.startswith(name_prefix) and entry.is_file(follow_symlinks=True):
                st = entry.stat()
                yield Listed(entry.name, st.st_size, str(st.st_mtime_ns))


def _list_s3(fs, folder: str, name_prefix: str) -> Iterator[Listed]:
    bucket, key, _ = fs.split_path(folder)
    base = f"{key}/" if key else ""
    kwargs = {"Bucket": bucket, "Prefix": base + name_prefix, "Delimiter": "/", "MaxKeys": LIST_PAGE}
    while True:
        page = retry(lambda: fs.call_s3("list_objects_v2", **kwargs))
        for obj in page.get("Contents", []):
            yield Listed(obj["Key"][len(base):], int(obj["Size"]), obj["ETag"].strip('"'))
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def list_names(fs, folder: str) -> Iterator[str]:
    """Names of the files and folders directly in `folder`: one request on S3 (first 1,000), one
    directory scan locally; a missing folder has none."""
    folder = folder.rstrip("/")
    if is_local(fs):
        try:
            yield from os.listdir(fs._strip_protocol(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
    elif is_s3(fs):
        bucket, key, _ = fs.split_path(folder)
        base = f"{key}/" if key else ""
        page = retry(lambda: fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=base, Delimiter="/",
                                        MaxKeys=LIST_PAGE))
        yield from (p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", []))
        yield from (o["Key"][len(base):] for o in page.get("Contents", []))
    else:
        try:
            yield from (e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(folder, detail=False))
        except FileNotFoundError:
            return


class NotAtomic(Exception):
    """The store cannot create a file only if it is absent."""


def put_if_absent(fs, path: str, data: bytes) -> bool:
    """Create `path` holding `data` only if nothing is there: True if created, False if something
    was. O_EXCL on local disk, a conditional put (If-None-Match: *) on S3; other stores cannot do
    it atomically and raise NotAtomic."""
    if is_local(fs):
        local = fs._strip_protocol(path)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        try:
            fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    if is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        try:
            retry(lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*"))
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        fs.invalidate_cache(path)
        return True
    raise NotAtomic(f"{fs.protocol} cannot create a file only if it is absent")


def _precondition_failed(exc: BaseException) -> bool:
    while exc is not None:
        if "PreconditionFailed" in str(exc) or "412" in str(getattr(exc, "response", {}).get("Error", {})):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
