"""WF-VAE latent pre-encoding service."""
from encoder_service.model import (CheckpointError, DecoderStream, DiagonalGaussian, EncoderStream, WFVAE,
                                   WFVAEConfig)

__version__ = "0.1.0"
__all__ = ["CheckpointError", "DecoderStream", "DiagonalGaussian", "EncoderStream", "WFVAE", "WFVAEConfig"]
