"""WF-VAE latent pre-encoding service."""
from encoder_service.model import WFVAE, CheckpointError, DecoderStream, DiagonalGaussian, EncoderStream, WFVAEConfig

__version__ = "0.1.0"
__all__ = ["CheckpointError", "DecoderStream", "DiagonalGaussian", "EncoderStream", "WFVAE", "WFVAEConfig"]
