"""Safe, strict checkpoint loading (spec section 8).

Only tensors are read: safetensors, or torch.load(weights_only=True). EMA weights are preferred
when a training checkpoint has them; `module.` prefixes are stripped; the constant Haar filters
(absent from EMA dicts) are filled in; any other missing, unexpected or mis-shaped key is an error
naming the file and the keys.
"""
import hashlib
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class CheckpointError(ValueError):
    pass


def sha256_file(path: str | Path, block: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | Path, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """The model weights stored in a .safetensors or torch checkpoint file, keys cleaned."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: holds Python objects besides tensors, which are not loaded for safety ({exc}). "
            "Re-save just the weights in a trusted environment, e.g. "
            "torch.save({'state_dict': ckpt['state_dict']}, 'weights.ckpt'), or convert to safetensors.") from exc
    return _select_weights(raw, path, prefer_ema)


def _select_weights(raw, path: Path, prefer_ema: bool) -> dict[str, torch.Tensor]:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(raw).__name__}")
    ema = raw.get("ema_state_dict")
    if ema and prefer_ema:
        state = ema
    elif "state_dict" in raw:
        state = raw["state_dict"]
        state = state.get("gen_model", state)
    elif ema:
        raise CheckpointError(f"{path}: holds only EMA weights, but prefer_ema=False asked for the plain ones")
    else:
        state = raw
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {_listing(bad)}")
    return {k.replace("module.", ""): v for k, v in state.items()}


def _listing(keys, limit=12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def constant_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fixed Haar filters every WF-VAE state dict holds, by key."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "constants"):
            out.update(module.constants(prefix=f"{name}."))
    return out


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model` (which may live on the meta device) strictly, by assignment."""
    expected = model.state_dict()
    constants = constant_entries(model)
    missing = [k for k in expected if k not in state and k not in constants]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [f"{k} {tuple(state[k].shape)} (model {tuple(expected[k].shape)})"
                  for k in state if k in expected and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} keys with other shapes: {_listing(mis_shaped)}")
    if problems:
        raise CheckpointError(f"{source} does not fit this WF-VAE config: " + "; ".join(problems)
                              + ". Check that the config (latent_dim, base_channels, connect_res_layer_num, ...) "
                              "is the one the checkpoint was trained with.")
    state = dict(state)
    for key, value in constants.items():
        if key not in state:
            state[key] = value
        elif not torch.equal(state[key].float(), value.to(state[key].dtype).float()):
            raise CheckpointError(f"{source}: {key} is not the WF-VAE Haar filter (expected taps "
                                  f"{value.flatten().tolist()})")
    model.load_state_dict(state, strict=True, assign=True)
