from encoder_service.model.checkpoint import CheckpointError
from encoder_service.model.config import PRESETS, WFVAEConfig
from encoder_service.model.posterior import DiagonalGaussian
from encoder_service.model.wfvae import WFVAE, DecoderStream, EncoderStream

__all__ = ["CheckpointError", "DecoderStream", "DiagonalGaussian", "EncoderStream", "PRESETS", "WFVAE",
           "WFVAEConfig"]
