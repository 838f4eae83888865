"""Strict, safe checkpoint loading: safetensors dirs, Open-Sora Plan style .ckpt files, clear errors."""
import hashlib
import json
import shutil

import pytest
import torch
from conftest import GOLDEN, max_abs
from safetensors.torch import load_file, save_file

from encoder_service import WFVAE, CheckpointError

CONSTANT_MARKERS = ("wavelet_transform",)


def golden_state():
    return load_file(GOLDEN / "weights.safetensors")


def ema_ckpt(tmp_path, state, name="merged.ckpt", extra=None):
    """An Open-Sora Plan style training checkpoint: EMA dict of trainable weights with DDP prefixes."""
    trainable = {f"module.{k}": v for k, v in state.items() if not any(m in k for m in CONSTANT_MARKERS)}
    path = tmp_path / name
    torch.save({"ema_state_dict": trainable, **(extra or {})}, path)
    shutil.copy(GOLDEN / "config.json", tmp_path / "config.json")
    return path


def test_ema_ckpt_loads_to_the_same_outputs_as_safetensors(tmp_path, golden_vae, golden_input):
    ref = golden_vae(torch.float32).encode(golden_input).moments
    path = ema_ckpt(tmp_path, golden_state())
    for source in (path, tmp_path):  # the file itself, or the folder holding one *.ckpt
        vae = WFVAE.from_pretrained(source)
        assert torch.equal(vae.encode(golden_input).moments, ref)
    assert vae.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_ema_preferred_and_switchable(tmp_path, golden_input):
    state = golden_state()
    plain = {k: (v * 0 if k.endswith("conv_out.conv.bias") else v) for k, v in state.items()}
    path = ema_ckpt(tmp_path, state, extra={"state_dict": {"gen_model": plain}})
    ema_vae, plain_vae = WFVAE.from_pretrained(path), WFVAE.from_pretrained(path, prefer_ema=False)
    assert torch.count_nonzero(ema_vae.encoder.conv_out.conv.bias) > 0
    assert torch.count_nonzero(plain_vae.encoder.conv_out.conv.bias) == 0


def test_config_argument_for_a_bare_weights_file(tmp_path, golden_input, golden_vae):
    weights = tmp_path / "w.safetensors"
    shutil.copy(GOLDEN / "weights.safetensors", weights)
    with pytest.raises(CheckpointError, match="no config.json"):
        WFVAE.from_pretrained(weights)
    vae = WFVAE.from_pretrained(weights, config=GOLDEN / "config.json")
    assert torch.equal(vae.encode(golden_input).moments, golden_vae().encode(golden_input).moments)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("decoder.conv_out.bias"), "1 missing keys: decoder.conv_out.bias"),
    (lambda s: s.update({"decoder.extra.weight": torch.zeros(1)}), "1 unexpected keys: decoder.extra.weight"),
    (lambda s: s.update({"decoder.conv_out.bias": torch.zeros(7)}), r"decoder.conv_out.bias \(7,\)"),
])
def test_wrong_keys_are_named(tmp_path, change, message):
    state = golden_state()
    change(state)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    shutil.copy(GOLDEN / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=message) as err:
        WFVAE.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_wrong_config_is_reported_not_silently_random(tmp_path):
    """The official loader's strict=False would leave flow branches random; we list the keys."""
    state = golden_state()
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    cfg = json.loads((GOLDEN / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "connect_res_layer_num": 2}))
    with pytest.raises(CheckpointError, match="missing keys: decoder.connect_l1.1.conv1"):
        WFVAE.from_pretrained(tmp_path)


def test_altered_haar_constant_is_refused(tmp_path):
    state = golden_state()
    state["encoder.wavelet_transform_in.h_conv.conv.weight"] = state[
        "encoder.wavelet_transform_in.h_conv.conv.weight"] * 0 + 0.35355339
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    shutil.copy(GOLDEN / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="not the WF-VAE Haar filter"):
        WFVAE.from_pretrained(tmp_path)


class NotATensor:
    pass


def test_pickled_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": golden_state(), "callback": NotATensor()}, path)
    shutil.copy(GOLDEN / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="Python objects besides tensors"):
        WFVAE.from_pretrained(path)


def test_several_ckpts_in_a_folder_are_ambiguous(tmp_path):
    ema_ckpt(tmp_path, golden_state(), "a.ckpt")
    ema_ckpt(tmp_path, golden_state(), "b.ckpt")
    with pytest.raises(CheckpointError, match="exactly one"):
        WFVAE.from_pretrained(tmp_path)


def test_bf16_stored_weights_load_in_fp32(tmp_path, golden_input, golden_vae):
    save_file({k: v.bfloat16() for k, v in golden_state().items()}, tmp_path / "diffusion_pytorch_model.safetensors")
    shutil.copy(GOLDEN / "config.json", tmp_path / "config.json")
    vae = WFVAE.from_pretrained(tmp_path)
    assert vae.dtype == torch.float32
    assert max_abs(vae.encode(golden_input).moments, golden_vae().encode(golden_input).moments) < 0.1
