"""Text embeddings beside the latents: equal to transformers' own encoder on the same tokens, each
distinct caption encoded once, bad encoder folders one line, a real job whose rows carry them and
whose reader returns them, and a folder that refuses another text encoder."""
import json
import shutil

import pytest
import torch
from conftest import GOLDEN
from tables import latent_rows

from encoder_service.job.config import load_config
from encoder_service.samples import write_tar, write_text_encoder, write_video
from encoder_service.table.schema import decode_tensor
from encoder_service.text.encoder import TextEncoder, TextEncoderError, identity

CAPTIONS = ["a test card", "the red dog runs past the blue cat", "a test card", "one two three"]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return write_text_encoder(tmp_path_factory.mktemp("t5"))


def reference(path, texts: list[str]) -> list[torch.Tensor]:
    """transformers' own encoder, one caption at a time (no padding at all)."""
    from transformers import AutoTokenizer, T5EncoderModel, UMT5EncoderModel
    tok = AutoTokenizer.from_pretrained(path)
    kind = json.loads((path / "config.json").read_text())["model_type"]
    model = (T5EncoderModel if kind == "t5" else UMT5EncoderModel).from_pretrained(path, use_safetensors=True).eval()
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt")).last_hidden_state[0] for t in texts]


@pytest.mark.parametrize("kind", ["t5", "umt5"])
def test_embeddings_equal_transformers_on_the_same_tokens(tmp_path, kind):
    path = write_text_encoder(tmp_path / kind, kind=kind)
    ours = TextEncoder(path, "fp32", "cpu").encode(CAPTIONS)
    for text, ref in zip(CAPTIONS, reference(path, CAPTIONS)):
        got = ours[text]
        assert got.values.shape == ref.shape and got.tokens == ref.shape[0] and not got.truncated
        assert torch.allclose(got.values, ref, atol=1e-5), (text, (got.values - ref).abs().max())


def test_identical_captions_are_encoded_once_and_long_ones_truncated(t5, monkeypatch):
    encoder = TextEncoder(t5, "fp32", "cpu", max_length=4)
    seen = []
    forward = encoder.model.forward
    monkeypatch.setattr(encoder.model, "forward", lambda **kw: seen.append(kw["input_ids"].shape[0]) or forward(**kw))
    out = encoder.encode(CAPTIONS)
    assert seen == [3] and len(out) == 3  # one batch of the distinct captions
    assert out["the red dog runs past the blue cat"].truncated and out["the red dog runs past the blue cat"].tokens == 4
    assert not out["a test card"].truncated


def test_a_text_encoder_folder_that_cannot_be_used_is_one_line(t5, tmp_path):
    no_tokenizer = tmp_path / "no-tok"
    shutil.copytree(t5, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(TextEncoderError, match="no tokenizer files"):
        identity(no_tokenizer)
    pickled = tmp_path / "pickled"
    shutil.copytree(t5, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(TextEncoderError, match="pytorch_model.bin are pickled: convert them to safetensors"):
        identity(pickled)


@pytest.mark.slow
def test_a_job_stores_each_rows_caption_embedding_and_refuses_another_encoder(t5, tmp_path, local_ray):
    from encoder_service.job.plan import JobError
    from encoder_service.job.run import run_job
    from encoder_service.reader import LatentShardDataset
    media = tmp_path / "media"
    media.mkdir()
    captions = ["a test card", "a test card", "the red dog runs", None]
    samples = [(f"v{i}", {"mp4": write_video(media / f"{i}.mp4", frames=12, h=32, w=40).read_bytes(),
                          **({"json": json.dumps({"caption": c}).encode()} if c else {})})
               for i, c in enumerate(captions)]
    write_tar(tmp_path / "shard-000000.tar", samples)
    args = ["--input", str(tmp_path / "shard-000000.tar"), "--output", str(tmp_path / "out"), "--checkpoint",
            str(GOLDEN / "weights.safetensors"), "--num-frames", "9", "--size", "32x32", "--num-gpus", "0",
            "--precision", "fp32", "--progress-every-s", "1000", "--metrics-linger-s", "0", "--text-encoder", str(t5)]
    record = run_job(load_config(args))
    assert record["latents"] == 4 and record["captions_missing"] == 1 and record["text_seconds_per_clip"] > 0
    from encoder_service.job.dryrun import dry_run  # the dry run builds the actor's encoder, text encoder included
    assert dry_run(load_config([*args, "--dry-run", "4"]))["encode_clips_per_s_per_device"] > 0
    rows = {r["source_key"]: r for r in latent_rows(tmp_path / "out")}
    refs = dict(zip(["a test card", "the red dog runs"], reference(t5, ["a test card", "the red dog runs"])))
    for i, caption in enumerate(captions):
        row = rows[f"v{i}"]
        if caption is None:
            assert row["text_embedding"] is None and row["text_tokens"] is None
            continue
        got = decode_tensor(row["text_embedding"], row["text_embedding_shape"], row["text_embedding_dtype"])
        assert row["caption"] == caption and torch.allclose(got, refs[caption], atol=1e-5)
    batch = next(iter(LatentShardDataset(str(tmp_path / "out"), batch_size=4, shuffle=False)))
    by_key = dict(zip(batch["source_key"], range(4)))
    assert batch["text_embedding"].shape == (4, 5, 16) and batch["text_mask"].sum().item() == 4 + 4 + 5
    i = by_key["v2"]
    assert torch.allclose(batch["text_embedding"][i][batch["text_mask"][i]], refs["the red dog runs"], atol=1e-5)
    other = write_text_encoder(tmp_path / "other", seed=1)
    with pytest.raises(JobError, match="other settings.*text_encoder"):
        run_job(load_config([*args[:-1], str(other)]))
