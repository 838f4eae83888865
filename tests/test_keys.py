"""Building the released configs gives exactly the released state-dict keys, shapes and kinds."""
import ast
import csv

import pytest
import torch
from conftest import DATA

from encoder_service import WFVAE, WFVAEConfig


def manifest(name):
    with open(DATA / f"{name}.keys.tsv") as f:
        return [(r["key"], tuple(ast.literal_eval(r["shape"])), r["kind"]) for r in csv.DictReader(f, delimiter="\t")]


def kinds(model):
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    params = {n for n, _ in model.named_parameters()}
    return lambda key: "frozen_param" if key in frozen else "param" if key in params else "buffer"


@pytest.mark.parametrize("preset", ["wfvae-l-16chn", "wfvae-s-8chn"])
def test_meta_build_matches_manifest(preset):
    with torch.device("meta"):
        model = WFVAE(preset)
    kind = kinds(model)
    ours = [(k, tuple(v.shape), kind(k)) for k, v in model.state_dict().items()]
    assert ours == manifest(preset)


@pytest.mark.parametrize("preset", ["wfvae-l-16chn", "wfvae-s-8chn"])
def test_released_config_json_reads_to_preset(preset):
    cfg = WFVAEConfig.from_json(DATA / f"{preset}.config.json")
    assert cfg == WFVAEConfig.preset(preset)  # named by the preset too (the rows' vae_name), not by the path
    # the L example ships 4 equal scale entries for 16 channels: expanded, not refused
    assert len(cfg.scale) == cfg.latent_dim and set(cfg.scale) == {0.18215}


def test_trainable_parameter_counts_match_the_cost_model():
    for preset, count in [("wfvae-l-16chn", 317_081_244), ("wfvae-s-8chn", 147_347_660)]:
        with torch.device("meta"):
            model = WFVAE(preset)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count


def test_config_refuses_what_it_cannot_build():
    raw = WFVAEConfig.preset("wfvae-s-8chn").to_dict()
    with pytest.raises(ValueError, match="l1_dowmsample_block"):
        WFVAEConfig.from_dict({**raw, "l1_dowmsample_block": "Spatial2xTime2x3DDownsample"})
    with pytest.raises(ValueError, match="norm_type"):
        WFVAEConfig.from_dict({**raw, "norm_type": "groupnorm"})
    with pytest.raises(ValueError, match="unknown keys"):
        WFVAEConfig.from_dict({**raw, "use_quant_layer": True})
    with pytest.raises(ValueError, match="scale has 3 entries"):
        WFVAEConfig.from_dict({**raw, "scale": [1.0, 2.0, 3.0]})
    missing = {k: v for k, v in raw.items() if k != "connect_res_layer_num"}
    with pytest.raises(ValueError, match="connect_res_layer_num"):
        WFVAEConfig.from_dict(missing)
