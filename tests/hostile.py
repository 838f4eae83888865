"""Hostile WebDataset shards, built from real encoded videos: every way of breaking a shard that
users have met, next to good samples, with what must become of each sample."""
import io
import json
import tarfile
from pathlib import Path

import av

from encoder_service.samples import pattern, write_size_change_video, write_video

NON_UTF8_NAME = b"caf\xe9-clip".decode("utf-8", "surrogateescape")  # a Latin-1 name, not UTF-8


def video_with_bad_tag(path: Path) -> Path:
    """A good H.264 video whose container title tag is not UTF-8."""
    with av.open(str(path), "w", format="mp4", metadata_errors="surrogateescape") as c:
        c.metadata["title"] = "caf\udce9"
        s = c.add_stream("libx264", rate=24)
        s.height, s.width, s.pix_fmt = 48, 64, "yuv420p"
        for i in range(12):
            c.mux(s.encode(av.VideoFrame.from_ndarray(pattern(i, 48, 64), format="rgb24")))
        c.mux(s.encode())
    return path


def _add(tar, name: str, data: bytes = b"", kind=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def hostile_shard(path: Path, media: Path) -> dict:
    """Write the shard; returns {"good": sample keys that must give clips, "ledger": sorted (key,
    reason) pairs of the rows that must appear (each exactly once)}. Clips of 9 frames at 32x32, max 200x200 px."""
    good = write_video(media / "good.mp4", frames=12, h=48, w=64).read_bytes()
    other = write_video(media / "other.webm", frames=12, h=48, w=64, codec="libvpx-vp9").read_bytes()
    portrait = write_video(media / "portrait.mp4", frames=12, h=48, w=64, rotation=90).read_bytes()
    spliced = write_size_change_video(media / "spliced.ts", (48, 64), (480, 640), frames=6).read_bytes()
    nested = ("[" * 100000 + "]" * 100000).encode()
    expected = {"good": {"good", "nested_json", "bad_tag", "caf%E9-clip", "dup", "dup#2", "twovideos", "portrait"},
                "ledger": sorted({"unknown_codec": "unsupported_codec", "bad": "corrupt", "bad#2": "corrupt",
                                  "twovideos.webm": "extra_video_member", "alias.mp4": "link_member",
                                  "hardalias.mp4": "link_member", "spliced/0": "too_large",
                                  "(shard)": "truncated_shard"}.items())
                + [("bad#2", "unsorted_tar"), ("dup#2", "unsorted_tar")]}  # keys seen again: said so
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        _add(tar, "good.mp4", good)
        _add(tar, "good.json", json.dumps({"caption": "fine"}).encode())
        _add(tar, "nested_json.mp4", good)
        _add(tar, "nested_json.json", nested)  # deeper than Python's json recursion: kept as raw text
        _add(tar, "bad_tag.mp4", video_with_bad_tag(media / "bad_tag.mp4").read_bytes())
        _add(tar, "unknown_codec.mp4", good.replace(b"avc1", b"zzzz"))
        _add(tar, NON_UTF8_NAME + ".mp4", good)
        _add(tar, "dup.mp4", good)
        _add(tar, "bad.mp4", b"not a video")
        _add(tar, "twovideos.mp4", good)
        _add(tar, "twovideos.webm", other)
        _add(tar, "alias.mp4", kind=tarfile.SYMTYPE, link="good.mp4")
        _add(tar, "hardalias.mp4", kind=tarfile.LNKTYPE, link="good.mp4")
        _add(tar, "dup.mp4", good)         # the same key again, later: kept as dup#2
        _add(tar, "bad.mp4", b"still not")  # two bad samples with one key: two rows
        _add(tar, "spliced.mp4", spliced)   # 64x48 in the header, 640x480 frames from frame 6
        _add(tar, "portrait.mp4", portrait)
        _add(tar, "lost.mp4", good)         # its header is cut in half below
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "lost.mp4").offset + 200
    path.write_bytes(data[:cut])
    return expected
