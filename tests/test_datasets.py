"""Datasets as users have them: shards webdataset reads (.tar, .tar.gz, .tgz, written by `tar`,
`tar czf`, webdataset.TarWriter and our `pack`), grouped into samples exactly as webdataset
groups them; clip spans (and their captions) from the sample's JSON; paths named twice. Videos
are ffmpeg-made H.264, HEVC and VP9, with and without audio."""
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from conftest import GOLDEN

from encoder_service import options
from encoder_service.ingest.clips import IngestConfig, IngestedClip, ingest_shard
from encoder_service.ingest.inputs import expand_inputs
from encoder_service.ingest.sampling import SamplingConfig
from encoder_service.ingest.tar_stream import Sample, iter_samples
from encoder_service.job.config import load_config
from encoder_service.records import LedgerRow
from encoder_service.samples import write_tar

ROOT = Path(__file__).resolve().parents[1]
SPANS = options.clip_mode("spans")
CODECS = {"h264.mp4": ["-c:v", "libx264"], "hevc.mp4": ["-c:v", "libx265", "-tag:v", "hvc1"],
          "vp9.webm": ["-c:v", "libvpx-vp9", "-b:v", "200k"]}


def ffmpeg_video(path: Path, seconds: float, audio: bool) -> Path:
    """A real video made by the ffmpeg CLI: testsrc pattern at 48x64, 24 fps, optional sine audio."""
    codec = CODECS[path.name.split("-")[-1]]
    inputs = ["-f", "lavfi", "-i", f"testsrc=size=64x48:rate=24:duration={seconds}"]
    if audio:
        inputs += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
        codec += ["-c:a", "libopus" if path.suffix == ".webm" else "aac"]
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *inputs, *codec, "-pix_fmt", "yuv420p", str(path)],
                   check=True, timeout=120)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    made = {}
    for i, name in enumerate(CODECS):
        made[name] = ffmpeg_video(d / f"clip{i}-{name}", seconds=2 + i, audio=i != 1)
    made["long"] = ffmpeg_video(d / "long-h264.mp4", seconds=20, audio=True)
    return made


def ingest(url, **sampling) -> tuple[list[IngestedClip], list[LedgerRow]]:
    items = list(ingest_shard(str(url), IngestConfig(SamplingConfig(num_frames=9, size=(32, 32), **sampling))))
    return [i for i in items if isinstance(i, IngestedClip)], [i for i in items if isinstance(i, LedgerRow)]


def webdataset_keys(url) -> list[str]:
    return [s["__key__"] for s in wds.WebDataset(str(url), shardshuffle=False, empty_check=False)]


def our_keys(url) -> list[str]:
    return [item.base_key for item in iter_samples(str(url)) if isinstance(item, Sample)]


# ---- shards -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_gzipped_shards_give_what_the_tar_gives(videos, tmp_path, suffix):
    samples = [(f"v{i}", {Path(p).suffix[1:]: Path(p).read_bytes(), "txt": b"a caption"})
               for i, p in enumerate(videos[n] for n in CODECS)]
    plain = write_tar(tmp_path / "shard-000000.tar", samples)
    members = tmp_path / "members"
    with tarfile.open(plain) as tar:
        names = tar.getnames()
        tar.extractall(members, filter="data")
    gz = tmp_path / f"shard-000001{suffix}"
    subprocess.run(["tar", "czf", str(gz), "-C", str(members), *names], check=True)  # as users gzip theirs
    assert expand_inputs([str(gz)]) == [str(gz)]
    want, want_rows = ingest(plain)
    got, got_rows = ingest(gz)
    assert len(want) == 3 and not want_rows and not got_rows  # H.264, HEVC, VP9 (with and without audio)
    assert [c.clip.key.split("/", 1)[1] for c in got] == [c.clip.key.split("/", 1)[1] for c in want]
    assert all((a.frames == b.frames).all() for a, b in zip(got, want))
    assert got[0].clip.key.startswith("shard-000001/")  # the shard id drops the whole suffix


def test_a_shard_of_concatenated_gzip_members_is_read_whole_and_a_crc_error_is_a_row(videos, tmp_path):
    """What `cat a.gz b.gz` and bgzip make: one tar split over several gzip members (`gzip -t` passes,
    `tar tzf` lists every member). Every video is read; a flipped byte in a member's CRC is the data's
    fault: a ledger row naming the shard, the samples before it kept."""
    samples = [(f"v{i}", {Path(p).suffix[1:]: Path(p).read_bytes()}) for i, p in enumerate(videos[n] for n in CODECS)]
    plain = write_tar(tmp_path / "shard-000000.tar", samples).read_bytes()
    third = len(plain) // 3
    members = [gzip.compress(plain[i * third:(i + 1) * third if i < 2 else None]) for i in range(3)]
    multi = tmp_path / "shard-000002.tgz"
    multi.write_bytes(b"".join(members))
    assert subprocess.run(["gzip", "-t", str(multi)]).returncode == 0
    listed = subprocess.run(["tar", "tzf", str(multi)], capture_output=True, text=True).stdout.split()
    got, rows = ingest(multi)
    assert len(got) == 3 == len(listed) and not rows
    damaged = bytearray(members[1])
    damaged[-8] ^= 0xFF  # the member's CRC32 (its trailer: CRC32, ISIZE)
    bad = tmp_path / "shard-000003.tgz"
    bad.write_bytes(members[0] + bytes(damaged) + members[2])
    got, rows = ingest(bad)
    reasons = {r.reason: r for r in rows}  # the shard's row, and the sample it cut its own row
    assert set(reasons) == {"corrupt_gzip", "truncated_member"}
    assert "shard-000003.tgz" in reasons["corrupt_gzip"].message
    assert len(got) + 1 == 3


def test_keys_are_grouped_as_webdataset_groups_them(videos, tmp_path):
    """Dots in names, upper-case extensions, nested folders; with TarWriter, and with GNU tar over
    a folder (tar's own order)."""
    mp4 = videos["h264.mp4"].read_bytes()
    names = {"a/b.c.MP4": mp4, "a/b.c.json": b"{}", "x.y.z.mp4": mp4, "x.y.z.TXT": b"t", "deep/er/v.mp4": mp4}
    folder = tmp_path / "files"
    for name, data in names.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    by_tar = tmp_path / "tar.tar"
    subprocess.run(["tar", "cf", str(by_tar), "-C", str(folder), "."], check=True)
    by_writer = write_tar(tmp_path / "writer.tar", [("a/b", {"c.MP4": mp4, "c.json": b"{}"}),
                                                    ("x", {"y.z.mp4": mp4, "y.z.TXT": b"t"}),
                                                    ("deep/er/v", {"mp4": mp4})])
    for shard in (by_tar, by_writer):
        assert our_keys(shard) == webdataset_keys(shard), shard


def test_an_unsorted_tar_says_so(videos, tmp_path):
    """`tar cf` in directory order can put a sample's caption far from its video: webdataset splits
    the sample; we split it the same way and the ledger says why and what to do."""
    shard = tmp_path / "shard-000000.tar"
    members = [("clip.v2.json", b'{"caption": "c"}'), ("other.mp4", videos["h264.mp4"].read_bytes()),
               ("clip.v2.mp4", videos["vp9.webm"].read_bytes())]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert our_keys(shard) == webdataset_keys(shard) == ["clip", "other", "clip"]
    clips, rows = ingest(shard)
    reasons = {r.key: r.reason for r in rows}
    assert reasons == {"shard-000000/clip": "no_video", "shard-000000/clip#2": "unsorted_tar"}
    message = next(r.message for r in rows if r.reason == "unsorted_tar")
    assert "tar --sort=name" in message and "pack" in message and "shard-000000.tar" in message
    assert sorted(c.clip.source_key for c in clips) == ["clip#2", "other"]


def test_a_shard_named_twice_is_one_shard(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    write_tar(d / "x.tar", [])
    assert expand_inputs([f"{d}//x.tar", f"{d}/x.tar", f"{d}/./x.tar"]) == [f"{d}/x.tar"]


# ---- spans ------------------------------------------------------------------------------------------
PANDA = {"timestamp": [["0:00:00.000", "0:00:01.500"], ["0:00:04.250", "0:00:09.000"], [12.0, 12.1],
                       ["0:00:18.000", "0:00:25.000"], ["0:00:30.000", "0:00:31.000"]],
         "caption": ["a test card", "the test card later", "too short", "runs past the end", "after the end"]}


@pytest.fixture(scope="module")
def panda_shard(videos, tmp_path_factory):
    d = tmp_path_factory.mktemp("panda")
    return write_tar(d / "shard-000000.tar", [("vid", {"mp4": videos["long"].read_bytes(),
                                                       "json": json.dumps(PANDA).encode()})])


def test_spans_with_captions_from_panda70m_metadata(panda_shard):
    clips, rows = ingest(panda_shard, clips=SPANS, spans_field="timestamp", captions_field="caption", fps=8)
    assert [c.clip.clip_index for c in clips] == [0, 1, 3]
    assert [c.clip.caption for c in clips] == ["a test card", "the test card later", "runs past the end"]
    assert [c.clip.span for c in clips] == [[0.0, 1.5], [4.25, 9.0], [18.0, 25.0]]
    for c in clips:  # frames inside the span, 1/8 s apart
        start, end = c.clip.span
        assert c.clip.frame_indices[0] == round(start * 24) and c.clip.frame_indices[-1] <= min(end, 20) * 24
        assert all(b - a == 3 for a, b in zip(c.clip.frame_indices, c.clip.frame_indices[1:]))
    assert {(r.key, r.reason) for r in rows} == {("shard-000000/vid/2", "span_too_short"),
                                                ("shard-000000/vid/4", "span_outside_video")}
    assert all("span" in r.message and "shard-000000.tar:vid.mp4" in r.message for r in rows)


def test_span_mistakes_are_ledger_rows(videos, tmp_path):
    """Each its own reason and message; a sample without the captions list keeps its spans, uncaptioned."""
    cases = {"none": {}, "bad": {"clips": [["x", 1]]}, "short_captions": {"clips": [[0, 1]], "caps": []},
             "reversed": {"clips": [[1, 0]], "caps": ["r"]}, "empty": {"clips": [[0.5, 0.5]], "caps": ["e"]},
             "no_captions": {"clips": [[0, 1.5]]}}
    shard = write_tar(tmp_path / "s.tar", [(k, {"mp4": videos["h264.mp4"].read_bytes(), "json": json.dumps(v).encode()})
                                           for k, v in cases.items()])
    clips, rows = ingest(shard, clips=SPANS, captions_field="caps", fps=8)
    assert [(c.clip.key, c.clip.caption) for c in clips] == [("s/no_captions/0", None)]
    assert {r.key.split("/")[1]: r.reason for r in rows} == {"none": "no_spans", "bad": "bad_spans",
                                                             "short_captions": "bad_captions",
                                                             "reversed": "bad_spans", "empty": "bad_spans"}
    messages = {r.key.split("/")[1]: r.message for r in rows}
    assert "ends before it starts" in messages["reversed"] and "is empty" in messages["empty"]


def test_spans_end_to_end_with_captions_in_the_latent_rows(panda_shard, tmp_path, local_ray):
    from encoder_service.job.run import run_job
    from encoder_service.reader import LatentShardDataset
    out = tmp_path / "out"
    cfg = load_config(["--input", str(panda_shard), "--output", str(out), "--checkpoint",
                       str(GOLDEN / "weights.safetensors"), "--num-frames", "9", "--size", "32x32", "--fps", "8",
                       "--clips-per-video", "spans", "--spans-field", "timestamp", "--captions-field", "caption",
                       "--num-gpus", "0", "--device", "cpu", "--precision", "fp32", "--progress-every-s", "1000",
                       "--metrics-linger-s", "0"])
    summary = run_job(cfg)
    assert (summary["latents"], summary["errors"]) == (3, 2)  # counts add up: 5 spans
    rows = sorted(LatentShardDataset(str(out), shuffle=False), key=lambda r: r["key"])
    assert [(r["caption"], r["span"]) for r in rows] == [("a test card", [0.0, 1.5]),
                                                         ("the test card later", [4.25, 9.0]),
                                                         ("runs past the end", [18.0, 25.0])]


# ---- pack -------------------------------------------------------------------------------------------
def pack(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "encoder_service", "pack", *map(str, args), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_pack_a_folder_with_sidecars(videos, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i, name in enumerate(CODECS):
        shutil.copy(videos[name], src / ("sub" if i else "") / f"v{i}.{Path(name).suffix[1:]}")
    (src / "v0.txt").write_text("a caption\n")
    (src / "sub" / "v1.json").write_text(json.dumps({"clips": [[0, 1]]}))
    (src / "broken.mp4").write_bytes(b"not a video")
    first = pack(src, tmp_path / "out", "--max-count", "2")
    assert first.returncode == 1 and "broken.mp4: not a readable video" in first.stderr
    assert "packed 3 videos into 2 shards" in first.stdout
    keys = [s["__key__"] for n in ("000000", "000001") for s in wds.WebDataset(str(tmp_path / f"out/shard-{n}.tar"),
                                                                               shardshuffle=False)]
    assert keys == ["sub/v1", "sub/v2", "v0"]
    clips, rows = ingest(tmp_path / "out" / "shard-000001.tar")
    assert json.loads(clips[0].clip.metadata)["txt"] == "a caption\n".strip()
    pack(src, tmp_path / "again", "--max-count", "2")  # deterministic: the same bytes
    assert all((tmp_path / "out" / n).read_bytes() == (tmp_path / "again" / n).read_bytes()
               for n in ("shard-000000.tar", "shard-000001.tar"))


def test_pack_a_table_with_spans_and_captions(videos, tmp_path):
    table = tmp_path / "videos.csv"
    long = shutil.copy(videos["long"], tmp_path / "long.mp4")
    table.write_text("path,caption,clips,source\n"
                     f'{Path(long).name},a long one,"[[0, 2], [4, 6]]",youtube\n'
                     'missing.mp4,gone,"[[0, 1]]",youtube\n')
    run = pack(table, tmp_path / "out", "--caption-column", "caption", "--spans-column", "clips")
    assert run.returncode == 1 and "missing.mp4: missing" in run.stderr
    (sample,) = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False))
    assert sample["__key__"] == "long" and sample["txt"] == b"a long one"
    assert json.loads(sample["json"]) == {"clips": [[0, 2], [4, 6]], "source": "youtube"}
    clips, rows = ingest(tmp_path / "out" / "shard-000000.tar", clips=SPANS)
    assert [c.clip.span for c in clips] == [[0.0, 2.0], [4.0, 6.0]] and not rows


def test_pack_mistakes_are_one_line(tmp_path):
    (tmp_path / "t.csv").write_text("file\nx.mp4\n")
    run = pack(tmp_path / "t.csv", tmp_path / "out")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "no column 'path'" in run.stderr


def test_pack_reports_bad_rows_and_odd_files_and_packs_the_rest(videos, tmp_path):
    """An empty spans cell is that row's line; a dangling link and a FIFO are reported, never opened."""
    long = shutil.copy(videos["long"], tmp_path / "long.mp4")
    shutil.copy(videos["long"], tmp_path / "other.mp4")
    shutil.copy(videos["long"], tmp_path / "third.mp4")
    table = tmp_path / "videos.csv"
    table.write_text(f'path,clips\n{Path(long).name},"[[0, 2]]"\nother.mp4,\nthird.mp4,[]\n')
    run = pack(table, tmp_path / "out", "--spans-column", "clips")
    assert run.returncode == 1 and "row 3 (" in run.stderr and "row 4 (" in run.stderr, run.stderr
    assert run.stderr.count("clips cell is empty") == 2
    assert "packed 1 videos into 1 shards" in run.stdout and "Traceback" not in run.stderr
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(videos["long"], src / "good.mp4")
    (src / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    os.mkfifo(src / "pipe.mp4")
    run = pack(src, tmp_path / "out2")
    assert run.returncode == 1 and "gone.mp4: a dangling link" in run.stderr, run.stderr
    assert "pipe.mp4: not a regular file" in run.stderr and "packed 1 videos" in run.stdout


@pytest.mark.parametrize("case, message", [
    ("max-count-0", "--max-count must be at least 1"),
    ("out-is-a-file", "is a file: give a folder"),
    ("header-only", "no videos to pack (no rows)"),
    ("bad-prefix", "--prefix must be a file-name prefix"),
])
def test_pack_mistakes_write_nothing(videos, tmp_path, case, message):
    shutil.copy(videos["long"], tmp_path / "v.mp4")
    table, out, extra = tmp_path / "t.csv", tmp_path / "out", []
    table.write_text("path\nv.mp4\n")
    if case == "max-count-0":
        extra = ["--max-count", "0"]
    elif case == "out-is-a-file":
        out.write_text("a file")
    elif case == "header-only":
        table.write_text("path\n")
    else:
        extra = ["--prefix", "a/b"]
    run = pack(table, out, *extra)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and message in lines[0], run.stderr
    assert not out.is_dir() or not list(out.iterdir())


def test_pack_prefix_lets_shards_packed_apart_share_a_folder(videos, tmp_path):
    shutil.copy(videos["long"], tmp_path / "v.mp4")
    (tmp_path / "t.csv").write_text("path\nv.mp4\n")
    for prefix in ("monday-", "tuesday-"):
        assert pack(tmp_path / "t.csv", tmp_path / "out", "--prefix", prefix).returncode == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["monday-000000.tar", "tuesday-000000.tar"]
