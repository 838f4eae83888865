"""Mistakes a user makes: each is one line and a non-zero exit, before Ray starts, in seconds, with
no traceback. Option values are argparse usage errors (exit 2); paths and settings are checked by
the job (exit 2 as well)."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import GOLDEN
from services import free_port, s3_server, silent_server  # noqa: F401

from encoder_service.job.config import load_config
from encoder_service.model import WFVAEConfig
from encoder_service.samples import write_tar, write_video
from pipelines.encode_dataset import main

ROOT = Path(__file__).resolve().parents[1]
CKPT = str(GOLDEN / "weights.safetensors")


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    video = write_video(d / "v.mp4", frames=12, h=48, w=64)
    return write_tar(d / "shard-000000.tar", [("a", {"mp4": video.read_bytes()})]), video


def run_cli(*args, timeout=60):
    start = time.time()
    result = subprocess.run([sys.executable, str(ROOT / "pipelines" / "encode_dataset.py"), *args],
                            capture_output=True, text=True, timeout=timeout)
    return result, time.time() - start


def base(shard, out):
    return ["--input", str(shard), "--output", str(out), "--checkpoint", CKPT]


@pytest.mark.parametrize("flag, value, message", [
    ("--num-frames", "16", "4k\\+1"),
    ("--size", "100x100", "multiples of 8"),
    ("--size", "256", "HxW"),
    ("--clips-per-video", "2", r"first, all, uniform:N, random:N \(N >= 1\) or spans"),
    ("--precision", "fp16", "precision must be one of"),
    ("--chunk-frames", "6", "multiple of 4"),
    ("--batch-size", "0", "batch size must be in"),
    ("--buckets", "33x256", "TxHxW"),
    ("--ingest-labels", "gpu", "key=value"),
])
def test_bad_option_values_are_usage_errors(shard, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        load_config([*base(shard[0], tmp_path / "out"), flag, value])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and last.startswith("encode_dataset.py: error:") and re.search(message, last), last


def test_a_usage_error_is_one_line_and_exit_2_in_seconds(shard, tmp_path):
    result, seconds = run_cli(*base(shard[0], tmp_path / "out"), "--num-frames", "16")
    assert result.returncode == 2 and seconds < 10 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("encode_dataset.py: error: argument --num-frames")


def test_bad_paths_and_inputs_are_one_line_before_ray(shard, tmp_path, capsys):
    good_shard, video = shard
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["--input", str(good_shard), "--output", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "nope")],
         "does not exist"),
        (["--input", str(good_shard), "--output", str(tmp_path / "a-file"), "--checkpoint", CKPT], "is a file"),
        (["--input", str(tmp_path / "none-*.tar"), "--output", str(tmp_path / "o"), "--checkpoint", CKPT],
         "matches no file"),
        (["--input", str(video), "--output", str(tmp_path / "o"), "--checkpoint", CKPT], "not a WebDataset shard"),
        (["--output", str(tmp_path / "o")], "are required"),
        (["--input", str(good_shard), "--output", str(tmp_path / "o2"), "--checkpoint", CKPT, "--model-config",
          "wfvae-s-8chn"], "does not fit this WF-VAE config"),
    ]
    for args, message in cases:  # in-process: the same main() the script runs
        code = main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, lines)
    assert not (tmp_path / "o2").exists(), "a config that does not fit the weights writes nothing"
    result, seconds = run_cli(*cases[0][0])  # and as a process: exit code, time, nothing but the line
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and seconds < 10 and len(lines) == 1 and cases[0][1] in lines[0], result.stderr


def test_a_config_file_is_read_through_the_same_parsers(shard, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    for text, message in (("num_frames: 16\n", "num_frames: frames per clip must be 4k+1"),
                          ("nmu_frames: 17\n", "unknown options ['nmu_frames']")):
        config.write_text(text)
        with pytest.raises(SystemExit) as exit_:
            load_config(["--config-file", str(config), *base(shard[0], tmp_path / "o")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_broken_config_file_and_options_that_exclude_each_other_are_one_line(shard, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("num_frames: [17\nsize: 32x32\n")  # a YAML syntax error
    for args, message in (
            (["--config-file", str(config)], "--config-file " + str(config) + ": while parsing"),
            (["--captions-field", "caption"], "--captions-field gives each span its caption: it needs"),
            (["--compile", "--cuda-graphs"], "--compile and --cuda-graphs are one or the other")):
        with pytest.raises(SystemExit) as exit_:
            load_config([*base(shard[0], tmp_path / "o"), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and message in err[0], err


def test_a_signed_url_is_a_shard_and_no_line_prints_its_secrets(tmp_path, capsys):
    """The shard name ignores the query string; whatever a line prints about such a URL is scrubbed."""
    from encoder_service.ingest.inputs import expand_inputs
    from encoder_service.ingest.tar_stream import shard_id_of
    secrets = ["sig-9f2e", "tok-77aa", "pw-hunter2", "key-1234", "sec-xyz", "at-abcd"]
    query = (f"X-Amz-Signature={secrets[0]}&token={secrets[1]}&password={secrets[2]}&api-key={secrets[3]}"
             f"&secret={secrets[4]}&access_token={secrets[5]}")
    url = f"http://127.0.0.1:9/data/shard-000007.tar?{query}"
    assert expand_inputs([url]) == [url] and shard_id_of(url) == "shard-000007"
    bad = f"http://127.0.0.1:9/data/video.mp4?{query}"
    code = main(["--input", bad, "--output", str(tmp_path / "o"), "--checkpoint", CKPT])
    err = capsys.readouterr().err
    assert code == 2 and "not a WebDataset shard" in err and not any(s in err for s in secrets), err
    with pytest.raises(SystemExit):
        load_config(["--input", url, "--output", str(tmp_path / "o"), "--checkpoint", CKPT, "--num-frames", url])
    err = capsys.readouterr().err
    assert "num-frames" in err and not any(s in err for s in secrets), err


@pytest.mark.parametrize("key, value", [("latent_dim", 10 ** 9), ("encoder_num_resblocks", 10 ** 7),
                                        ("base_channels", 0), ("latent_dim", 16.5)])
def test_model_config_values_are_bounded_before_anything_is_built(tmp_path, capsys, key, value):
    raw = json.loads((GOLDEN / "config.json").read_text())
    start = time.time()
    with pytest.raises(ValueError, match=f"{key}="):
        WFVAEConfig.from_dict({**raw, key: value})
    assert time.time() - start < 1
    (tmp_path / "config.json").write_text(json.dumps({**raw, key: value}))
    (tmp_path / "w.safetensors").write_bytes((GOLDEN / "weights.safetensors").read_bytes())
    checkpoint = str(tmp_path / "w.safetensors")
    assert main(["--input", "x.tar", "--output", str(tmp_path / "o"), "--checkpoint", checkpoint]) == 2
    assert f"{key}=" in capsys.readouterr().err


def test_an_output_store_that_refuses_hangs_or_has_no_credentials_is_one_line(shard, tmp_path, capsys,
                                                                              s3_server, monkeypatch):  # noqa: F811
    """Before Ray, within the store timeouts, exit 2 with one line naming --output; nothing written."""
    (tmp_path / "a-file").write_text("x")
    closed = f"http://127.0.0.1:{free_port()}"
    fast = ["--store-connect-timeout-s", "1", "--store-read-timeout-s", "1", "--store-attempts", "1"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with silent_server() as hung:
        cases = [([*base(shard[0], "s3://bucket/out"), "--s3-endpoint-url", closed, *fast], "did not answer"),
                 ([*base(shard[0], "s3://bucket/out"), "--s3-endpoint-url", hung, *fast], "did not answer"),
                 ([*base(shard[0], tmp_path / "a-file" / "out")], "is a file")]
        for args, message in cases:
            start = time.time()
            code = main([str(a) for a in args])
            lines = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and message in lines[0] and "--output" in lines[0], (args, lines)
            assert time.time() - start < 20, (args, time.time() - start)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup off this machine
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    code = main([*map(str, base(shard[0], "s3://bucket/out")), "--s3-endpoint-url", s3_server.endpoint, *fast])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "NoCredentialsError" in lines[0], lines


def test_a_hanging_output_store_says_what_it_waits_for_until_the_bound(shard, tmp_path, capsys, monkeypatch):
    """A store that accepts connections and never answers: a [plan] line every --progress-every-s
    naming --output and the bound, then one error line within attempts x timeouts (+ slack)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    slow = ["--store-connect-timeout-s", "1", "--store-read-timeout-s", "2", "--store-attempts", "2",
            "--progress-every-s", "1"]
    with silent_server() as hung:
        start = time.time()
        code = main([*map(str, base(shard[0], "s3://bucket/out")), "--s3-endpoint-url", hung, *slow])
        seconds = time.time() - start
    captured = capsys.readouterr()
    waiting = [line for line in captured.out.splitlines() if line.startswith("[plan] waiting for --output s3://bucket/out")]
    assert code == 2 and len(captured.err.strip().splitlines()) == 1, captured.err
    assert waiting and "gives up within 6s: 2 attempts" in waiting[0], captured.out
    assert seconds < 6 * 3 + 10, seconds  # each request within its bound; planning makes a few in turn


def test_an_error_raised_inside_ray_is_its_own_line():
    """What Ray wraps (a traceback text, module-qualified class names, its own errors around it) comes
    out as the user's exception in one line, credentials scrubbed."""
    from encoder_service.job.run import _root_cause
    inner = RuntimeError("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                         "encoder_service.model.checkpoint.CheckpointError: w.safetensors does not fit this WF-VAE "
                         "config: 20 missing keys: a, b (s3://AKIA:secret@host)")
    try:
        raise Exception("RayTaskError(RuntimeError): wrapped") from inner
    except Exception as exc:  # noqa: BLE001
        line = _root_cause(exc)
    assert line.startswith("CheckpointError: w.safetensors does not fit") and "secret" not in line
    assert "\n" not in line
