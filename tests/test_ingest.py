"""Ingest real WebDataset shards of real encoded videos: good clips, every bad kind, counts that add up,
one resize definition for both decoders, rotation, the pixel limit on every decoded frame."""
import json
import os
import tarfile
import tracemalloc

import numpy as np
import pytest
from hostile import hostile_shard

from encoder_service import options
from encoder_service.ingest.clips import IngestConfig, IngestedClip, ShardUnavailable, ingest_shard
from encoder_service.ingest.decoders import get_decoder, probe
from encoder_service.ingest.geometry import plan_geometry
from encoder_service.ingest.sampling import SampleError, SamplingConfig, choose_bucket, plan_clips
from encoder_service.ingest.tar_stream import safe_key
from encoder_service.options import OptionError, bucket
from encoder_service.records import LedgerRow
from encoder_service.samples import pattern, write_audio_only, write_tar, write_vfr_video, write_video

H, W = 64, 80
DECODERS = ["pyav", "decord"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    files = {
        "mp4": write_video(d / "a.mp4", frames=30),
        "webm": write_video(d / "b.webm", frames=30, codec="libvpx-vp9"),
        "mkv": write_video(d / "c.mkv", frames=30),
        "avi": write_video(d / "d.avi", frames=30, codec="mpeg4"),
        "mov": write_video(d / "e.mov", frames=30),
        "short": write_video(d / "short.mp4", frames=5),
        "big": write_video(d / "big.mp4", frames=9, h=256, w=320),
        "vfr": write_vfr_video(d / "vfr.mp4", frames=40),
        "audio": write_audio_only(d / "audio.mp4"),
        "long": write_video(d / "long.mp4", frames=120, gop=24),
    }
    return {k: v.read_bytes() for k, v in files.items()}, files


def shard_of_every_kind(tmp_path, media):
    data, _ = media
    samples = [(f"good_{ext}", {ext: data[ext], "json": json.dumps({"caption": ext}).encode(), "txt": b"hello"})
               for ext in ("mp4", "webm", "mkv", "avi", "mov")]
    samples += [
        ("corrupt", {"mp4": os.urandom(5000)}),
        ("truncated", {"mp4": data["mp4"][: len(data["mp4"]) // 2]}),
        ("empty", {"mp4": b""}),
        ("notvideo", {"mp4": b"this is a caption, not a video" * 10}),
        ("audioonly", {"mp4": data["audio"]}),
        ("tooshort", {"mp4": data["short"]}),
        ("huge", {"mp4": data["big"]}),
        ("vfr", {"mp4": data["vfr"]}),
        ("nomedia", {"json": b"{}"}),
    ]
    return write_tar(tmp_path / "shard-000001.tar", samples), len(samples)


def run(url, decoder="pyav", **sampling):
    sampling = {"num_frames": 9, "size": (H, W), "max_pixels": 200 * 200, **sampling}
    cfg = IngestConfig(SamplingConfig(**sampling), decoder)
    clips, errors = [], []
    for item in ingest_shard(str(url), cfg):
        (clips if isinstance(item, IngestedClip) else errors).append(item)
    return clips, errors


@pytest.mark.parametrize("decoder", DECODERS)
def test_shard_of_every_kind(tmp_path, media, decoder):
    url, n_samples = shard_of_every_kind(tmp_path, media)
    clips, errors = run(url, decoder)
    by_key = {e.key.split("/")[1]: e for e in errors}
    assert {c.clip.source_key for c in clips} == {"good_mp4", "good_webm", "good_mkv", "good_avi", "good_mov"}
    assert {k: e.reason for k, e in by_key.items()} == {
        "corrupt": "corrupt", "truncated": "corrupt", "empty": "empty", "notvideo": "corrupt",
        "audioonly": "no_video_stream", "tooshort": "too_short", "huge": "too_large",
        "vfr": "variable_frame_rate", "nomedia": "no_video"}
    assert all("shard-000001.tar" in e.message for e in errors), "messages name the input"
    # every sample accounted for: one clip (mode "first") or one error
    assert len({c.clip.source_key for c in clips}) + len(errors) == n_samples
    first = next(c for c in clips if c.clip.source_key == "good_mp4")
    assert first.clip.key == "shard-000001/good_mp4/0" and first.frames.shape == (9, H, W, 3)
    assert first.frames.dtype == np.uint8 and first.clip.frame_indices == list(range(9))
    assert first.clip.src_hw == [H, W] and first.clip.crop_box == [0, 0, H, W] and first.clip.bucket == f"9x{H}x{W}"
    assert json.loads(first.clip.metadata) == {"json": {"caption": "mp4"}, "txt": "hello"}
    assert first.clip.src_fps == first.clip.clip_fps == 24.0


def test_hostile_shard_loses_nothing(tmp_path):
    """Each hostile class next to good samples: every good sample gives a clip, every bad thing
    exactly one ledger row with its key; nothing escapes as an exception."""
    media = tmp_path / "media"
    media.mkdir()
    expected = hostile_shard(tmp_path / "hostile.tar", media)
    clips, errors = run(tmp_path / "hostile.tar", size=(32, 32))
    assert {c.clip.source_key for c in clips} == expected["good"]
    got = sorted((e.key.split("/", 1)[1] if "/" in e.key else "(shard)", e.reason) for e in errors)
    assert got == sorted(expected["ledger"])
    assert all(isinstance(e, LedgerRow) and "hostile.tar" in e.message for e in errors)
    nested = next(c for c in clips if c.clip.source_key == "nested_json")
    assert json.loads(nested.clip.metadata)["json_raw"].startswith("[[[")


@pytest.mark.parametrize("decoder", DECODERS)
def test_frames_equal_an_independent_decode(tmp_path, media, decoder):
    """Without resizing, clip pixels equal a plain decode of the source file at those indices,
    converted as the docs state (libavfilter `scale=flags=bilinear+accurate_rnd+bitexact`, RGB24)."""
    import av
    import av.filter
    data, files = media

    def rgb(frame):
        graph = av.filter.Graph()
        graph.link_nodes(graph.add_buffer(template=stream), graph.add("scale", "flags=bilinear+accurate_rnd+bitexact"),
                         graph.add("format", "rgb24"), graph.add("buffersink")).configure()
        graph.push(frame)
        return graph.pull().to_ndarray()

    url = write_tar(tmp_path / "s.tar", [("v", {"mp4": data["mp4"]})])
    with av.open(str(files["mp4"])) as c:
        stream = c.streams.video[0]
        reference = np.stack([rgb(f) for f in c.decode(stream)])
    clips, errors = run(url, decoder, stride=2, clips="all")
    assert not errors and len(clips) == 1  # 30 frames, span 17: one non-overlapping clip
    assert clips[0].clip.frame_indices == list(range(0, 18, 2))
    assert np.array_equal(clips[0].frames, reference[0:18:2])
    assert np.abs(reference[3].astype(int) - pattern(3, H, W)).mean() < 8  # lossy H.264, crf 18


@pytest.mark.parametrize("size", [(32, 48), (48, 48), (128, 160), (24, 96), (H, W)])
def test_decord_and_pyav_give_the_same_pixels(tmp_path, media, size):
    """One resize definition (libswscale bilinear + RGB24 in one pass, then crop): bit-identical
    pixels from both decoders, downscaling, upscaling, with crops, at the stored size; every clip
    of a long video."""
    data, _ = media
    url = write_tar(tmp_path / "s.tar", [("v", {"mp4": data["long"]})])
    by_decoder = {d: run(url, d, size=size, clips="all")[0] for d in DECODERS}
    assert len(by_decoder["pyav"]) == len(by_decoder["decord"]) == 13
    for a, b in zip(by_decoder["pyav"], by_decoder["decord"]):
        assert a.clip == b.clip and np.array_equal(a.frames, b.frames)


def test_late_clips_after_a_keyframe_seek_are_frame_exact(media):
    """PyAV starts at the keyframe before the first clip: the frames equal a decode from frame 0."""
    _, files = media
    info = probe(files["long"])
    assert len(info.keyframes) > 2  # GOP 24 over 120 frames
    geometry = plan_geometry((info.height, info.width), 0, (H, W))
    late = [list(range(70, 79)), list(range(100, 109))]
    seeked = dict(get_decoder("pyav").clips(files["long"], info, late, geometry, None))
    no_seek = info.__class__(**{**info.__dict__, "keyframes": ()})
    full = dict(get_decoder("pyav").clips(files["long"], no_seek, late, geometry, None))
    assert all(np.array_equal(seeked[i], full[i]) for i in range(2))
    assert np.abs(seeked[1][0].astype(int) - pattern(100, H, W)).mean() < 8


@pytest.mark.parametrize("decoder", DECODERS)
def test_display_rotation_is_applied(tmp_path, decoder):
    """A portrait phone video (stored 64x48, displayed 48x64): clips come out upright with either
    decoder, and the bucket is chosen from the displayed size."""
    stored = write_video(tmp_path / "p.mp4", frames=12, h=48, w=64, rotation=90)
    upright = write_video(tmp_path / "u.mp4", frames=12, h=48, w=64)
    info = probe(stored)
    assert info.rotation == 90 and info.display_hw == (64, 48)
    url = write_tar(tmp_path / "s.tar", [("p", {"mp4": stored.read_bytes()}), ("u", {"mp4": upright.read_bytes()})])
    clips, errors = run(url, decoder, buckets=((9, 64, 48), (9, 48, 64)))
    assert not errors
    portrait, landscape = clips
    assert portrait.clip.bucket == "9x64x48" and portrait.clip.src_hw == [64, 48] and portrait.clip.rotation == 90
    assert landscape.clip.bucket == "9x48x64"
    # upright: the landscape clip turned, to within a few levels. Exact when this test runs alone;
    # after other tests (torch) in the same process the portrait stream's pixels have come out a
    # level or two apart over much of the frame and up to 9 at places (not understood yet: a
    # determinism issue of the PyAV path, noted on the issue). A wrong orientation differs by ~100.
    diff = np.abs(portrait.frames.astype(int) - np.rot90(landscape.frames, 1, axes=(1, 2)).astype(int))
    assert diff.mean() < 3 and np.quantile(diff, 0.99) <= 12, (diff.mean(), diff.max())


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_stream_that_grows_after_its_header_is_held_to_the_pixel_limit(tmp_path, decoder):
    from encoder_service.samples import write_size_change_video
    spliced = write_size_change_video(tmp_path / "s.ts", (48, 64), (480, 640), frames=12)
    url = write_tar(tmp_path / "s.tar", [("v", {"mp4": spliced.read_bytes()})])
    clips, errors = run(url, decoder, size=(32, 32), clips="all")
    if decoder == "pyav":  # sees the 640x480 frames and refuses them; frames 0-8 are 64x48
        assert [c.clip.key for c in clips] == ["s/v/0"]
        assert [(e.key, e.stage, e.reason) for e in errors] == [("s/v/1", "decode", "too_large")]
    else:  # decord fails on the splice itself
        assert not clips and {e.reason for e in errors} == {"decode_failed"} and len(errors) == 2


def test_clip_selection_modes(tmp_path, media):
    data, _ = media
    url = write_tar(tmp_path / "s.tar", [("v", {"mp4": data["mp4"]})])
    assert [c.clip.frame_indices[0] for c in run(url, clips="all")[0]] == [0, 9, 18]
    assert [c.clip.frame_indices[0] for c in run(url, clips="uniform:3")[0]] == [0, 10, 21]
    first = [c.clip.frame_indices[0] for c in run(url, clips="random:2", seed=5)[0]]
    assert first == [c.clip.frame_indices[0] for c in run(url, clips="random:2", seed=5)[0]]
    assert len(first) == 2 and all(0 <= f <= 21 for f in first)
    assert [c.clip.key for c in run(url, clips="uniform:3")[0]] == [f"s/v/{i}" for i in range(3)]


def test_variable_frame_rate_is_sampled_by_time(tmp_path, media):
    data, files = media
    url = write_tar(tmp_path / "s.tar", [("v", {"mp4": data["vfr"]})])
    clips, errors = run(url, fps=10.0)
    assert not errors
    times = probe(files["vfr"]).timestamps
    chosen = clips[0].clip.frame_indices
    for k, i in enumerate(chosen):  # each chosen frame is the one on screen at 0, 0.1, 0.2, ... s
        assert times[i] <= k / 10 + 1e-6 and (i + 1 == len(times) or times[i + 1] > k / 10)
    assert clips[0].clip.clip_fps == 10.0


def test_probe_reads_the_index_not_the_packets(media):
    """An mp4's complete index gives the timestamps of a constant-rate video without demuxing;
    variable-rate videos and unindexed streams get exact packet times."""
    _, files = media
    info = probe(files["long"])
    assert info.num_frames == 120 and np.allclose(np.diff(info.timestamps), 1 / 24)
    assert probe(files["vfr"]).num_frames == 40


def test_min_duration(tmp_path, media):
    data, _ = media
    url = write_tar(tmp_path / "s.tar", [("v", {"mp4": data["mp4"]})])
    clips, errors = run(url, min_duration=5.0)
    assert not clips and errors[0].reason == "too_short" and "min-duration" in errors[0].message


def test_unreadable_shards_are_not_data_truncated_ones_are(tmp_path, media):
    data, _ = media
    with pytest.raises(ShardUnavailable, match="retried by the next run"):
        run(tmp_path / "missing.tar")
    full = write_tar(tmp_path / "t.tar", [("a", {"mp4": data["mp4"]}), ("b", {"mp4": data["mkv"]}),
                                          ("c", {"mp4": data["mov"]})])
    raw = full.read_bytes()
    cut = raw.index(data["mkv"][:64]) + 100  # in the middle of sample b's video
    (tmp_path / "cut.tar").write_bytes(raw[:cut])
    clips, errors = run(tmp_path / "cut.tar")
    assert [c.clip.source_key for c in clips] == ["a"]
    assert [(e.key, e.reason) for e in errors] == [("cut/b", "truncated_member"), ("cut", "truncated_shard")]
    (tmp_path / "notatar.tar").write_bytes(b"hello" * 1000)
    assert [e.reason for e in run(tmp_path / "notatar.tar")[1]] == ["not_a_tar"]


def test_keys_are_storable_and_unambiguous():
    assert safe_key("a/b.c") == "a/b.c"
    assert safe_key(b"caf\xe9".decode("utf-8", "surrogateescape")) == "caf%E9"
    assert safe_key("50%#1") == "50%25%231"  # % and # escaped: no escaped key equals a plain one
    assert safe_key("日本") == "日本"


def test_buckets_nearest_aspect():
    cfg = SamplingConfig(buckets=tuple(bucket(b) for b in ("33x256x256", "33x480x848", "33x848x480")))
    assert choose_bucket(cfg, (720, 1280)) == (33, 480, 848)
    assert choose_bucket(cfg, (1080, 1080)) == (33, 256, 256)
    assert choose_bucket(cfg, (1920, 1080)) == (33, 848, 480)
    with pytest.raises(OptionError, match="4k\\+1"):
        bucket("32x256x256")


def test_bucket_crop_box(tmp_path):
    big = write_video(tmp_path / "wide.mp4", frames=9, h=72, w=160)
    url = write_tar(tmp_path / "s.tar", [("v", {"mp4": big.read_bytes()})])
    clips, _ = run(url, buckets=((9, 64, 64), (9, 48, 96)))
    assert clips[0].clip.bucket == "9x48x96" and clips[0].frames.shape == (9, 48, 96, 3)
    assert clips[0].clip.crop_box[2:] == [48, 96]


def test_plan_clips_too_short_message():
    with pytest.raises(SampleError, match="a clip needs 33 frames"):
        plan_clips(SamplingConfig(), 20, np.arange(20) / 24, "k", 33)


def _hwm_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])
    return 0


def test_streaming_a_200mb_member_stays_small(tmp_path, media):
    data, _ = media
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("huge.mp4")
        info.size = 200 << 20
        with open(tmp_path / "blob", "wb") as f:
            for _ in range(200):
                f.write(os.urandom(1 << 20))
        with open(tmp_path / "blob", "rb") as f:
            tar.addfile(info, f)
        good = tarfile.TarInfo("ok.mp4")
        good.size = len(data["mp4"])
        import io
        tar.addfile(good, io.BytesIO(data["mp4"]))
    os.unlink(tmp_path / "blob")
    tracemalloc.start()
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark
    except OSError:
        pass
    rss_before = _hwm_kib()
    clips, errors = run(path)
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth = (_hwm_kib() - rss_before) << 10
    assert [c.clip.source_key for c in clips] == ["ok"] and errors[0].reason == "corrupt"
    assert py_peak < 16 << 20, f"python allocations peaked at {py_peak >> 20} MiB"
    assert rss_growth < 64 << 20, f"RSS grew by {rss_growth >> 20} MiB for a 200 MiB member"


DIGEST = """
import hashlib, sys
from encoder_service import options
from encoder_service.ingest.clips import IngestConfig, IngestedClip, ingest_shard
from encoder_service.ingest.sampling import SamplingConfig

def simd_off():
    # FFmpeg's own switch (ffmpeg -cpuflags 0): plain C code, as on a CPU without the SIMD paths
    import av, ctypes, ctypes.util, glob, os
    bundled = glob.glob(os.path.join(os.path.dirname(av.__file__), os.pardir, "av.libs", "libavutil*.so*"))
    ctypes.CDLL(bundled[0] if bundled else ctypes.util.find_library("avutil")).av_force_cpu_flags(0)

def digest(url, threads):
    cfg = IngestConfig(SamplingConfig(num_frames=9, size=(40, 24), clips=options.clip_mode("all")), "pyav",
                       threads=threads)
    items = sorted((i for i in ingest_shard(url, cfg) if isinstance(i, IngestedClip)), key=lambda i: i.clip.key)
    return hashlib.sha256(b"".join(i.frames.tobytes() for i in items)).hexdigest() + f" {len(items)}"

if __name__ == "__main__":
    if sys.argv[3] == "simd-off":
        simd_off()
    print(digest(sys.argv[1], int(sys.argv[2])))
"""


def test_streams_decode_to_the_same_bytes_on_any_cpu_and_in_any_process_state(tmp_path):
    """Rotated and upright streams, scaled and kept at their stored size (odd strides after the
    rotation), decoded in fresh interpreters with one and four threads and with FFmpeg's SIMD off
    (another CPU), and in this process after other decoding and torch work: the same bytes each
    time (a redone shard must be byte-identical on any node). With plain `bilinear` the frames kept
    at their size came out 2-3 levels apart with SIMD off."""
    import subprocess
    import sys

    import torch
    stored = [(48 + 8 * i, 64 + 8 * i, rot) for i, rot in enumerate([90, 270, 180, 90, 0])]
    stored += [(24, 40, 90), (40, 24, 0), (40, 24, 180)]  # displayed 40x24: no scaling
    samples = [(f"v{i}", {"mp4": write_video(tmp_path / f"p{i}.mp4", frames=20, h=h, w=w,
                                             rotation=rot).read_bytes()}) for i, (h, w, rot) in enumerate(stored)]
    url = str(write_tar(tmp_path / "s.tar", samples))
    fresh = {subprocess.run([sys.executable, "-c", DIGEST, url, str(threads), simd], capture_output=True,
                            text=True, check=True).stdout.strip()
             for threads, simd in ((1, "simd-on"), (4, "simd-on"), (1, "simd-off"))}
    torch.randn(256, 256) @ torch.randn(256, 256)
    run(url, size=(56, 40), clips=options.clip_mode("all"))  # other sizes first, in this process
    here = {"__name__": "digest"}
    exec(DIGEST, here)  # (not __main__: defines digest only)
    assert len(fresh) == 1 and fresh == {here["digest"](url, 2)}, fresh
