"""WF-VAE hyper-parameters: one dataclass, the two released presets, and the released config.json reader."""
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# The only block combination the released weights use (spatial level 1, 4x temporal compression).
# Keys keep the official spelling ("dowmsample") because that is what config.json files contain.
_BLOCKS = {
    "l1_dowmsample_block": "Downsample",
    "l1_downsample_wavelet": "HaarWaveletTransform2D",
    "l2_dowmsample_block": "Spatial2xTime2x3DDownsample",
    "l2_downsample_wavelet": "HaarWaveletTransform3D",
    "l1_upsample_block": "Upsample",
    "l1_upsample_wavelet": "InverseHaarWaveletTransform2D",
    "l2_upsample_block": "Spatial2xTime2x3DUpsample",
    "l2_upsample_wavelet": "InverseHaarWaveletTransform3D",
    "attention_type": "AttnBlock3DFix",
}
_SUPPORTED = {"norm_type": ("layernorm",), "t_interpolation": ("trilinear",)}
# Sizes are checked before anything is built: a config.json with latent_dim=10**9 would allocate
# gigabytes, encoder_num_resblocks=10**7 build modules for minutes. The released models sit far inside.
_BOUNDS = {"latent_dim": (1, 256), "base_channels": (1, 2048), "encoder_num_resblocks": (1, 16),
           "encoder_energy_flow_hidden_size": (1, 4096), "decoder_num_resblocks": (1, 16),
           "decoder_energy_flow_hidden_size": (1, 4096), "connect_res_layer_num": (1, 16)}


@dataclass(frozen=True)
class WFVAEConfig:
    latent_dim: int = 16
    base_channels: int = 192
    encoder_num_resblocks: int = 2
    encoder_energy_flow_hidden_size: int = 128
    decoder_num_resblocks: int = 2
    decoder_energy_flow_hidden_size: int = 128
    connect_res_layer_num: int = 1
    use_attention: bool = True
    norm_type: str = "layernorm"
    t_interpolation: str = "trilinear"
    dropout: float = 0.0
    scale: tuple[float, ...] = field(default=(0.18215,) * 16)
    shift: tuple[float, ...] = field(default=(0.0,) * 16)
    name: str = "custom"

    def __post_init__(self):
        for key, (lo, hi) in _BOUNDS.items():
            value = getattr(self, key)
            if type(value) is not int or not lo <= value <= hi:
                raise ValueError(f"WF-VAE config: {key}={value!r} must be an integer in [{lo}, {hi}]")
        for key, allowed in _SUPPORTED.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"WF-VAE config: {key}={getattr(self, key)!r} is not supported "
                                 f"(released checkpoints use {allowed[0]!r})")
        # scale/shift are per-channel; the official L example ships 4 equal entries for 16 channels
        for key in ("scale", "shift"):
            values = tuple(float(v) for v in getattr(self, key))
            if len(values) != self.latent_dim:
                if len(set(values)) != 1:
                    raise ValueError(f"WF-VAE config: {key} has {len(values)} entries but latent_dim is "
                                     f"{self.latent_dim}; give one value per latent channel")
                values = values[:1] * self.latent_dim
            object.__setattr__(self, key, values)

    @classmethod
    def preset(cls, name: str) -> "WFVAEConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown WF-VAE preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_dict(cls, raw: dict, name: str = "custom") -> "WFVAEConfig":
        """Read a released config.json dict: block-name keys are checked, `_`-prefixed keys ignored."""
        own = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = [k for k in raw if k not in own and k not in _BLOCKS and not k.startswith("_")]
        if unknown:
            raise ValueError(f"WF-VAE config {name}: unknown keys {unknown}")
        for key, expected in _BLOCKS.items():
            if key in raw and raw[key] != expected:
                raise ValueError(f"WF-VAE config {name}: {key}={raw[key]!r} is not supported "
                                 f"(only {expected!r}, as in the released checkpoints)")
        # The official constructor defaults differ from every released config: refuse to guess.
        missing = [k for k in ("latent_dim", "base_channels", "norm_type", "t_interpolation",
                               "connect_res_layer_num") if k not in raw]
        if missing:
            raise ValueError(f"WF-VAE config {name}: missing {missing}; the official code defaults "
                             "differ from the released models, so these must be given")
        return cls(**{k: raw[k] for k in own if k in raw}, name=name)

    @classmethod
    def from_json(cls, path: str | Path) -> "WFVAEConfig":
        """Named as a reader would call it: the preset it equals (a released model's config.json),
        else the checkpoint folder's name -- never the path as typed."""
        path = Path(path)
        config = cls.from_dict(json.loads(path.read_text()), name=str(path))  # (messages name the file)
        same = [name for name, preset in PRESETS.items() if dataclasses.replace(preset, name=config.name) == config]
        return dataclasses.replace(config, name=same[0] if same else path.resolve().parent.name)

    def to_dict(self) -> dict:
        """The released config.json form (what from_dict reads back)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}
        out.update(scale=list(self.scale), shift=list(self.shift), **_BLOCKS)
        return out


PRESETS = {
    "wfvae-l-16chn": WFVAEConfig(name="wfvae-l-16chn"),
    "wfvae-s-8chn": WFVAEConfig(latent_dim=8, base_channels=128, encoder_energy_flow_hidden_size=64,
                                decoder_energy_flow_hidden_size=128, connect_res_layer_num=2,
                                scale=(0.18215,) * 8, shift=(0.0,) * 8, name="wfvae-s-8chn"),
}
