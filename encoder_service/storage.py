"""Storage access for local paths, s3:// and any fsspec URL, with retries for flaky object stores."""
import hashlib
import re
import time
from dataclasses import dataclass, field

import fsspec


@dataclass(frozen=True)
class StorageOptions:
    """How to reach the object store. `endpoint_url` points s3:// at an S3-compatible server."""
    endpoint_url: str | None = None
    extra: dict = field(default_factory=dict)

    def for_url(self, url: str) -> dict:
        if not url.startswith(("s3://", "s3a://")):
            return dict(self.extra)
        opts = {"config_kwargs": {"retries": {"max_attempts": 8, "mode": "adaptive"}}, **self.extra}
        if self.endpoint_url:
            opts["client_kwargs"] = {**opts.get("client_kwargs", {}), "endpoint_url": self.endpoint_url}
        return opts


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+(:[^/\s@]*)?@")
_SIGNED = re.compile(r"(?i)\b(X-Amz-(?:Credential|Signature|Security-Token)|AWSAccessKeyId|Signature)=[^&\s]+")


def scrub(text: str) -> str:
    """The text with credentials in URLs (user:password@, signed-URL parameters) replaced by ***."""
    return _SIGNED.sub(r"\1=***", _USERINFO.sub(r"\1***@", text))


def filesystem(url: str, options: StorageOptions | None = None):
    """(fsspec filesystem, path inside it) for a URL or local path."""
    return fsspec.core.url_to_fs(url, **(options or StorageOptions()).for_url(url))


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


def retry(fn, *, attempts: int = 5, base_delay: float = 0.5):
    """Call fn() until it succeeds, backing off exponentially on OSError (network, throttling);
    the last failure is raised. A missing file is an answer, not a failure."""
    for attempt in range(attempts - 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError:
            time.sleep(base_delay * 2 ** attempt)
    return fn()
