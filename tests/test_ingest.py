"""Ingest real WebDataset shards of real encoded videos: good clips, every bad kind, counts that add up."""
import json
import os
import tarfile
import tracemalloc

import numpy as np
import pytest

from encoder_service.ingest.clips import IngestConfig, ingest_shard
from encoder_service.ingest.decoders import get_decoder, probe
from encoder_service.ingest.sampling import SamplingConfig, choose_bucket, parse_bucket, plan_clips
from encoder_service.samples import pattern, write_audio_only, write_tar, write_vfr_video, write_video

H, W = 64, 80


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


def run(url, decoder="decord", **sampling):
    cfg = IngestConfig(SamplingConfig(**{"num_frames": 9, "size": (H, W), "max_pixels": 200 * 200, **sampling}), decoder)
    clips, errors = [], []
    for kind, record in ingest_shard(str(url), cfg):
        (clips if kind == "clip" else errors).append(record)
    return clips, errors


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_shard_of_every_kind(tmp_path, media, decoder):
    url, n_samples = shard_of_every_kind(tmp_path, media)
    clips, errors = run(url, decoder)
    by_key = {e["key"].split("/")[1]: e for e in errors}
    assert {c["source_key"] for c in clips} == {"good_mp4", "good_webm", "good_mkv", "good_avi", "good_mov"}
    assert {k: e["reason"] for k, e in by_key.items()} == {
        "corrupt": "corrupt", "truncated": "corrupt", "empty": "empty", "notvideo": "corrupt",
        "audioonly": "no_video_stream", "tooshort": "too_short", "huge": "too_large",
        "vfr": "variable_frame_rate", "nomedia": "no_video"}
    assert all("shard-000001.tar" in e["message"] for e in errors), "messages name the input"
    # every sample accounted for: one clip (mode "first") or one error
    assert len({c["source_key"] for c in clips}) + len(errors) == n_samples
    clip = next(c for c in clips if c["source_key"] == "good_mp4")
    assert clip["key"] == "shard-000001/good_mp4/0" and clip["frames"].shape == (9, H, W, 3)
    assert clip["frames"].dtype == np.uint8 and clip["frame_indices"] == list(range(9))
    assert clip["src_hw"] == [H, W] and clip["crop_box"] == [0, 0, H, W] and clip["bucket"] == f"9x{H}x{W}"
    assert json.loads(clip["metadata"]) == {"json": {"caption": "mp4"}, "txt": "hello"}
    assert clip["src_fps"] == clip["clip_fps"] == 24.0


def test_frames_equal_an_independent_decode(tmp_path, media):
    """Clip pixels equal PyAV's own decode of the source file at the same indices (no resize)."""
    import av
    data, files = media
    url = write_tar(tmp_path / "s.tar", [("v", {"mp4": data["mp4"]})])
    with av.open(str(files["mp4"])) as c:
        reference = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    for decoder in ("decord", "pyav"):
        clips, errors = run(url, decoder, stride=2, clips="all")
        assert not errors and len(clips) == 1  # 30 frames, span 17: one non-overlapping clip
        assert clips[0]["frame_indices"] == list(range(0, 18, 2))
        assert np.array_equal(clips[0]["frames"], reference[0:18:2])
    # decoding is close to what was encoded (lossy H.264, crf 18)
    assert np.abs(reference[3].astype(int) - pattern(3, H, W)).mean() < 8


def test_clip_selection_modes(tmp_path, media):
    data, _ = media
    url = write_tar(tmp_path / "s.tar", [("v", {"mp4": data["mp4"]})])
    assert [c["frame_indices"][0] for c in run(url, clips="all")[0]] == [0, 9, 18]
    assert [c["frame_indices"][0] for c in run(url, clips="uniform:3")[0]] == [0, 10, 21]
    first = [c["frame_indices"][0] for c in run(url, clips="random:2", seed=5)[0]]
    assert first == [c["frame_indices"][0] for c in run(url, clips="random:2", seed=5)[0]]
    assert len(first) == 2 and all(0 <= f <= 21 for f in first)
    assert [c["key"] for c in run(url, clips="uniform:3")[0]] == [f"s/v/{i}" for i in range(3)]


def test_variable_frame_rate_is_sampled_by_time(tmp_path, media):
    data, files = media
    url = write_tar(tmp_path / "s.tar", [("v", {"mp4": data["vfr"]})])
    clips, errors = run(url, fps=10.0)
    assert not errors
    times = probe(files["vfr"]).timestamps
    picked = times[clips[0]["frame_indices"]]
    # each chosen frame is the one on screen at 0, 0.1, 0.2, ... s
    for k, t in enumerate(picked):
        assert t <= k / 10 + 1e-6 and (clips[0]["frame_indices"][k] + 1 == len(times) or times[clips[0]["frame_indices"][k] + 1] > k / 10)
    assert clips[0]["clip_fps"] == 10.0


def test_min_duration(tmp_path, media):
    data, _ = media
    url = write_tar(tmp_path / "s.tar", [("v", {"mp4": data["mp4"]})])
    clips, errors = run(url, min_duration=5.0)
    assert not clips and errors[0]["reason"] == "too_short" and "min-duration" in errors[0]["message"]


def test_unreadable_and_truncated_shards(tmp_path, media):
    data, _ = media
    clips, errors = run(tmp_path / "missing.tar")
    assert not clips and [e["reason"] for e in errors] == ["unreadable_shard"]
    full = write_tar(tmp_path / "t.tar", [("a", {"mp4": data["mp4"]}), ("b", {"mp4": data["mkv"]}),
                                          ("c", {"mp4": data["mov"]})])
    raw = full.read_bytes()
    cut = raw.index(data["mkv"][:64]) + 100  # in the middle of sample b's video
    (tmp_path / "cut.tar").write_bytes(raw[:cut])
    clips, errors = run(tmp_path / "cut.tar")
    assert [c["source_key"] for c in clips] == ["a"]
    assert [(e["key"], e["reason"]) for e in errors] == [("cut/b", "truncated_member"), ("cut", "truncated_shard")]


def test_buckets_nearest_aspect():
    cfg = SamplingConfig(buckets=tuple(parse_bucket(b) for b in ("33x256x256", "33x480x848", "33x848x480")))
    assert choose_bucket(cfg, (720, 1280)) == (33, 480, 848)
    assert choose_bucket(cfg, (1080, 1080)) == (33, 256, 256)
    assert choose_bucket(cfg, (1920, 1080)) == (33, 848, 480)
    with pytest.raises(ValueError, match="4k\\+1"):
        parse_bucket("32x256x256")


def test_bucket_crop_box(tmp_path):
    big = write_video(tmp_path / "wide.mp4", frames=9, h=72, w=160)
    url = write_tar(tmp_path / "s.tar", [("v", {"mp4": big.read_bytes()})])
    clips, _ = run(url, buckets=((9, 64, 64), (9, 48, 96)))
    assert clips[0]["bucket"] == "9x48x96" and clips[0]["frames"].shape == (9, 48, 96, 3)
    assert clips[0]["crop_box"] == [0, 0, 48, 96] or clips[0]["crop_box"][2:] == [48, 96]


def test_plan_clips_too_short_message():
    from encoder_service.ingest.sampling import SampleError
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
    assert [c["source_key"] for c in clips] == ["ok"] and errors[0]["reason"] == "corrupt"
    assert py_peak < 16 << 20, f"python allocations peaked at {py_peak >> 20} MiB"
    assert rss_growth < 64 << 20, f"RSS grew by {rss_growth >> 20} MiB for a 200 MiB member"
