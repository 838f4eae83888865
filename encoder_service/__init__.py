"""WF-VAE latent pre-encoding service.

The package face loads nothing heavy: `from encoder_service import WFVAE` imports the model (and
torch) on first use, so ingest workers, `inspect` and the reader, which import submodules, never
pay for it."""
import importlib

__version__ = "0.1.0"
__all__ = ["CheckpointError", "DecoderStream", "DiagonalGaussian", "EncoderStream", "WFVAE", "WFVAEConfig"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("encoder_service.model"), name)
    raise AttributeError(f"module 'encoder_service' has no attribute {name!r}")
