"""WFVAE: the model users load (diffusers-style API), with whole-clip, chunked and streaming inference."""
from pathlib import Path

import torch
from torch import nn

from encoder_service.model.cache import CausalCache
from encoder_service.model.checkpoint import WEIGHTS_NAME, CheckpointError, load_weights, read_state_dict, sha256_file
from encoder_service.model.config import WFVAEConfig
from encoder_service.model.decoder import Decoder
from encoder_service.model.encoder import Encoder
from encoder_service.model.posterior import DiagonalGaussian


class WFVAE(nn.Module):
    def __init__(self, config: WFVAEConfig | str = "wfvae-l-16chn"):
        super().__init__()
        self.config = WFVAEConfig.preset(config) if isinstance(config, str) else config
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.checkpoint_path: str | None = None
        self.checkpoint_sha256: str | None = None

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, config: WFVAEConfig | str | Path | None = None,
                        prefer_ema: bool = True, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", state: dict | None = None,
                        sha256: str | None = None) -> "WFVAE":
        """Load a released checkpoint: a directory (config.json + diffusion_pytorch_model.safetensors,
        or a single *.ckpt) or a weights file (.safetensors / .ckpt) next to a config.json.

        `config` overrides the config.json: a WFVAEConfig, a preset name or a config.json path.
        `state` (read_state_dict of the same file) and `sha256` (its hash) let a caller that already
        holds them load a second model without reading or hashing the file again.
        """
        weights, cfg = resolve_checkpoint(Path(path), config)
        with torch.device("meta"):
            model = cls(cfg)
        load_weights(model, state if state is not None else read_state_dict(weights, prefer_ema), source=str(weights))
        model.checkpoint_path, model.checkpoint_sha256 = str(weights), sha256 or sha256_file(weights)
        return model.to(device=device, dtype=dtype).eval()

    # ---- inference -----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_out.weight.dtype

    @torch.no_grad()
    def encode(self, x: torch.Tensor, chunk_frames: int | None = None) -> DiagonalGaussian:
        """x (B, 3, T, H, W) in [-1, 1] (or uint8 in [0, 255], e.g. a permuted view of (B, T, H, W, 3)
        frames), T = 4k+1, H and W multiples of 8 -> posterior over
        (B, z, k+1, H/8, W/8). With chunk_frames=N (a multiple of 4) the clip runs through the
        encoder N frames at a time with the causal cache; the result equals the whole-clip one."""
        x = check_video(x, self.dtype)
        if chunk_frames is None:
            return DiagonalGaussian(self.encoder(x))
        stream = EncoderStream(self, chunk_frames)
        posterior = stream.encode(x, last=True)
        stream.close()
        return posterior

    @torch.no_grad()
    def decode(self, z: torch.Tensor, chunk_latents: int | None = None) -> torch.Tensor:
        """z (B, z, t, h, w) -> video (B, 3, 4(t-1)+1, 8h, 8w), not clamped. With chunk_latents=M
        the decoder runs M latent frames at a time; the result equals the whole-clip one."""
        z = check_latent(z, self.config.latent_dim, self.dtype)
        if chunk_latents is None:
            return self.decoder(z)
        return DecoderStream(self, chunk_latents).push(z, final=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(x).mode())

    def encode_stream(self, chunk_frames: int = 16) -> "EncoderStream":
        return EncoderStream(self, chunk_frames)

    def decode_stream(self, chunk_latents: int = 4) -> "DecoderStream":
        return DecoderStream(self, chunk_latents)


class EncoderStream:
    """Encode one clip (or a batch of same-shape clips) from frames given in pieces of any size.

    `push` returns the posterior of every latent frame that became final (latent 0 with frame 0,
    latent j once frame 4j is in), or None; at most `chunk_frames` frames (after the first) go
    through the encoder at once, so memory does not grow with the clip. `close` checks that no
    frames are left over.
    """

    def __init__(self, vae: WFVAE, chunk_frames: int = 16):
        if chunk_frames < 4 or chunk_frames % 4:
            raise ValueError(f"chunk_frames must be a positive multiple of 4, got {chunk_frames}")
        self.vae, self.chunk_frames = vae, chunk_frames
        self.cache, self.pending, self.frames_in = CausalCache(), None, 0

    @torch.no_grad()
    def push(self, frames: torch.Tensor, last: bool = False) -> DiagonalGaussian | None:
        """last=True: these are the clip's last frames (its last chunk keeps no causal context)."""
        return self.encode(frames, last)

    def encode(self, frames: torch.Tensor, last: bool = False) -> DiagonalGaussian | None:
        """push() without its no_grad wrapper (which torch.compile cannot trace through when called
        from inside an already no_grad WFVAE.encode)."""
        frames = check_video(frames, self.vae.dtype, whole_clip=False)
        x = frames if self.pending is None else torch.cat([self.pending, frames], dim=2)
        out = []
        while True:
            first = self.frames_in == 0
            usable = x.shape[2] - 1 if first else x.shape[2]
            n = min(usable // 4 * 4, self.chunk_frames) + (1 if first else 0)
            if usable < 0 or n == 0:
                break
            self.cache.last = last and x.shape[2] - n < 4  # no frames left for another chunk
            out.append(self.vae.encoder(x[:, :, :n], self.cache))
            x, self.frames_in = x[:, :, n:], self.frames_in + n
        self.pending = x if x.shape[2] else None
        return DiagonalGaussian(torch.cat(out, dim=2)) if out else None

    def close(self) -> None:
        if self.pending is not None:
            n = self.pending.shape[2]
            raise ValueError(f"encoder stream ended with {n} frame(s) that do not complete a latent frame: "
                             f"clips must have 4k+1 frames ({self.frames_in} were encoded); "
                             f"trim the last {n} or pad to {self.frames_in + 4}")


class DecoderStream:
    """Decode latent frames given in pieces of any size. `push` returns the video frames that are
    final (the last two of each piece wait for the next latent: the temporal upsampler looks one
    latent ahead); `close` (or push(..., final=True)) returns the rest."""

    def __init__(self, vae: WFVAE, chunk_latents: int = 4):
        if chunk_latents < 1:
            raise ValueError(f"chunk_latents must be >= 1, got {chunk_latents}")
        self.vae, self.chunk_latents, self.cache = vae, chunk_latents, CausalCache()

    @torch.no_grad()
    def push(self, z: torch.Tensor, final: bool = False) -> torch.Tensor | None:
        z = check_latent(z, self.vae.config.latent_dim, self.vae.dtype)
        pieces = z.split(self.chunk_latents, dim=2)
        out = [self.vae.decoder(p, self.cache, final=final and i == len(pieces) - 1)
               for i, p in enumerate(pieces)]
        return _cat_frames(out)

    @torch.no_grad()
    def close(self) -> torch.Tensor | None:
        return _cat_frames([self.vae.decoder(None, self.cache)])


def _cat_frames(outputs) -> torch.Tensor | None:
    frames = [o for o in outputs if o is not None]
    return torch.cat(frames, dim=2) if frames else None


# ---- input checks --------------------------------------------------------------------------------
def check_video(x: torch.Tensor, dtype: torch.dtype, whole_clip: bool = True) -> torch.Tensor:
    """Refuse inputs the model would silently mishandle, saying how to fix them."""
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        raise ValueError(f"WF-VAE expects video as a (B, 3, T, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    b, c, t, h, w = x.shape
    if c != 3:
        raise ValueError(f"WF-VAE expects 3 (RGB) channels in dim 1, got {c}; is the input (B, T, H, W, C)? "
                         "Use x.permute(0, 4, 1, 2, 3)")
    if whole_clip and (t - 1) % 4:
        lo = (t - 1) // 4 * 4 + 1
        raise ValueError(f"WF-VAE needs 4k+1 frames (1, 5, 9, ..., 33, ...), got {t}: "
                         f"keep the first {lo} frames or pad to {lo + 4}")
    if h % 8 or w % 8 or h == 0 or w == 0:
        raise ValueError(f"WF-VAE needs height and width that are multiples of 8, got {h}x{w}: "
                         f"crop to {h // 8 * 8}x{w // 8 * 8} or resize")
    if x.dtype == torch.uint8:
        return x  # [0, 255] frames: mapped to [-1, 1] inside the wavelet pyramid, no float copy
    if not x.is_floating_point():
        raise ValueError(f"WF-VAE expects float video in [-1, 1] or uint8 frames in [0, 255], got {x.dtype}")
    if x.numel() and not torch.compiler.is_compiling():  # a data-dependent branch: compiled callers check
        lo, hi = x.aminmax()                               # before (the engine does, on the host)
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"WF-VAE expects values in [-1, 1], got [{lo.item():.3g}, {hi.item():.3g}]: "
                             "map [0, 1] with 2x - 1, or pass [0, 255] frames as uint8")
    return x.to(dtype)


def check_latent(z: torch.Tensor, latent_dim: int, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(z, torch.Tensor) or z.ndim != 5 or z.shape[1] != latent_dim:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"WF-VAE decode expects latents (B, {latent_dim}, t, h, w), got {shape}")
    return z.to(dtype)


def check_weights_fit(weights: Path, config: WFVAEConfig) -> None:
    """CheckpointError naming the missing, unexpected or mis-shaped keys if the weights do not
    load strictly into a model of this config (built on the meta device, nothing allocated)."""
    with torch.device("meta"):
        model = WFVAE(config)
    load_weights(model, read_state_dict(weights, True), source=str(weights))


def resolve_checkpoint(path: Path, config) -> tuple[Path, WFVAEConfig]:
    """Find the weights file and the config for a from_pretrained() path."""
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.exists():
            ckpts = sorted(path.glob("*.ckpt"))
            if len(ckpts) != 1:
                found = ", ".join(p.name for p in ckpts) or "none"
                raise CheckpointError(f"{path}: expected {WEIGHTS_NAME} or exactly one *.ckpt (found: {found}); "
                                      "pass the weights file itself")
            weights = ckpts[0]
        config_file = path / "config.json"
    elif path.is_file():
        weights, config_file = path, path.parent / "config.json"
    else:
        raise CheckpointError(f"checkpoint {path} does not exist")
    if isinstance(config, WFVAEConfig):
        return weights, config
    if isinstance(config, str) and not config.endswith(".json"):
        return weights, WFVAEConfig.preset(config)
    if config is not None:
        config_file = Path(config)
    if not config_file.exists():
        raise CheckpointError(f"{weights}: no config.json next to it; pass config='wfvae-l-16chn', "
                              "config='wfvae-s-8chn' or the path of its config.json")
    return weights, WFVAEConfig.from_json(config_file)
