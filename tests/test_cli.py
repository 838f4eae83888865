"""The CLI on a real H.264 file with the golden checkpoint."""
import pytest
import torch
from safetensors.torch import load_file

from encoder_service.cli import main
from encoder_service.clip_commands import to_model_input
from encoder_service.ingest.decoders import get_decoder, probe
from encoder_service.ingest.geometry import plan_geometry
from encoder_service.samples import write_video


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", frames=20)


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_encode_writes_the_latents_of_those_frames(tmp_path, video, golden_dir, golden_vae, decoder):
    out = tmp_path / "lat.safetensors"
    assert main(["encode", str(video), "--checkpoint", str(golden_dir), "--frames", "9", "--stride", "2",
                 "--size", "32x48", "--decoder", decoder, "--out", str(out)]) == 0
    info = probe(video)
    _, frames = next(get_decoder("pyav").clips(video, info, [list(range(0, 18, 2))],
                                               plan_geometry((info.height, info.width), 0, (32, 48)), None))
    expected = golden_vae().encode(to_model_input(frames))
    saved = load_file(out)
    assert saved["mean"].shape == (1, 16, 3, 4, 6)
    # decord and PyAV decode the same H.264 bitstream to identical pixels
    assert torch.equal(saved["mean"], expected.mean) and torch.equal(saved["logvar"], expected.logvar)


def test_reconstruct_writes_a_video_and_reports_quality(tmp_path, video, golden_dir, capsys):
    out = tmp_path / "rec.mp4"
    assert main(["reconstruct", str(video), "--checkpoint", str(golden_dir), "--frames", "17", "--size", "32x32",
                 "--chunk-frames", "8", "--chunk-latents", "2", "--out", str(out)]) == 0
    assert probe(out).num_frames == 17
    assert "PSNR" in capsys.readouterr().out


def test_too_short_video_is_a_clear_error(tmp_path, video, golden_dir, capsys):
    assert main(["encode", str(video), "--checkpoint", str(golden_dir), "--frames", "33",
                 "--out", str(tmp_path / "x")]) == 2
    assert "has 20 frames, needs 33" in capsys.readouterr().err


def test_bad_size_is_refused():
    with pytest.raises(SystemExit):
        main(["encode", "v.mp4", "--checkpoint", "c", "--size", "250x250", "--out", "x"])
