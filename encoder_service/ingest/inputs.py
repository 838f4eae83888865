"""The input shards a run names: patterns expanded to URLs, and what the store says of each.

Patterns are brace ranges (`shard-{000000..999999}.tar`) and globs. Identities (size and ETag on
S3, size and mtime locally) come from one listing per input folder, narrowed to the longest common
prefix of the names asked for there, so a million named shards cost about a thousand requests.
"""
import posixpath
import re
import sys
from collections import Counter, defaultdict

from braceexpand import braceexpand

from encoder_service.ingest.tar_stream import shard_id_of
from encoder_service.records import InputIdentity
from encoder_service.storage import StorageOptions, filesystem, glob_urls, is_local, is_s3, list_prefix, scrub

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what webdataset reads (gzip streamed: tarfile "r|*")


class InputError(ValueError):
    """--input names something that is not a usable shard: one line, exit 2."""


def expand_inputs(patterns: list[str], storage: StorageOptions | None = None) -> list[str]:
    """Brace ranges first, then globs; order kept, duplicates dropped. A glob that matches nothing
    or a name that is not a tar shard is an InputError."""
    urls = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if any(c in without_query(url) for c in "*?["):
                matched = glob_urls(url, storage)
                if not matched:
                    raise InputError(f"--input {url} matches no file")
                urls += matched
            else:
                urls.append(url)
    for url in urls:
        if not without_query(url).endswith(SHARD_SUFFIXES):
            raise InputError(f"--input {url} is not a WebDataset shard (.tar, .tar.gz or .tgz); pack videos into "
                             "shards with `python -m encoder_service pack SRC OUT`")
    urls = list(dict.fromkeys(normalise(u) for u in urls))
    counts = Counter(shard_id_of(u) for u in urls)
    dupes = sorted(i for i, n in counts.items() if n > 1)
    if dupes:
        raise InputError(f"input shards share output names {dupes[:5]}: shard ids come from file names, "
                       "so shards in different folders must have different names")
    return urls


def without_query(url: str) -> str:
    """The URL without its query string (a signed URL's signature is not part of the shard's name)."""
    return url.split("?", 1)[0] if "://" in url and not url.startswith(("s3://", "s3a://", "file://")) else url


def normalise(url: str) -> str:
    """One spelling per local file (`dir//./x.tar` is `dir/x.tar`), so the same shard named twice is
    encoded once. Object-store keys are kept as given: `a//b` and `a/b` are different S3 objects."""
    scheme, sep, path = url.rpartition("://")
    if (sep and scheme != "file") or ("//" not in path and "./" not in path):
        return url
    path = re.sub(r"/+", "/", path)
    path = re.sub(r"(?:^|(?<=/))\./", "", path) or "."
    return f"{scheme}{sep}{path}"


def input_identities(urls: list[str], storage: StorageOptions | None) -> dict[str, InputIdentity]:
    """What the store says of each input (size and ETag, or mtime locally), from one listing per
    input folder, narrowed to the longest common prefix of the names asked for there. Inputs not
    found, and stores that cannot list (plain HTTP), have none."""
    folders: dict[str, list[str]] = defaultdict(list)
    for url in urls:
        folders[posixpath.dirname(url)].append(url)
    found = {}
    for members in folders.values():
        fs, path = filesystem(members[0], storage)
        if not (is_local(fs) or is_s3(fs)):
            continue
        names = [posixpath.basename(u) for u in members]
        try:
            listing = {e.name: e for e in list_prefix(fs, posixpath.dirname(path), posixpath.commonprefix(names))}
        except Exception as exc:  # noqa: BLE001 - the inputs' store failing: their shards fail when read
            print(scrub(f"[plan] cannot list {posixpath.dirname(members[0])} ({type(exc).__name__}: {exc}): its "
                        f"{len(members)} inputs are planned without their identities"), file=sys.stderr, flush=True)
            continue
        for url, name in zip(members, names):
            if name in listing:
                found[url] = InputIdentity(listing[name].size, listing[name].tag)
    return found
