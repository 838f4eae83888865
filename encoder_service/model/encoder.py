"""WF-VAE encoder (spec section 5): a Haar pyramid whose low bands flow straight into the latent."""
import torch
from torch import nn

import kernels
from encoder_service.model.blocks import (
    CausalConv3d,
    ChannelNorm,
    Downsample,
    FrameConv2d,
    MidBlock,
    ResnetBlock2D,
    ResnetBlock3D,
    Sequence,
    Spatial2xTime2x3DDownsample,
    conv_layout,
)
from encoder_service.model.cache import CausalCache
from encoder_service.model.config import WFVAEConfig
from encoder_service.model.wavelet import HaarWaveletTransform2D, HaarWaveletTransform3D


class Encoder(nn.Module):
    def __init__(self, cfg: WFVAEConfig):
        super().__init__()
        b, le, n = cfg.base_channels, cfg.encoder_energy_flow_hidden_size, cfg.encoder_num_resblocks
        self.down1 = Sequence([FrameConv2d(24, b, 3, padding=1), *(ResnetBlock2D(b, b) for _ in range(n)),
                               Downsample(b)])
        self.down2 = Sequence([FrameConv2d(b + le, 2 * b, 3, padding=1),
                               *(ResnetBlock3D(2 * b, 2 * b) for _ in range(n)), Spatial2xTime2x3DDownsample(2 * b)])
        self.connect_l1 = FrameConv2d(12, le, 3, padding=1)
        self.connect_l2 = FrameConv2d(24, le, 3, padding=1)
        self.mid = MidBlock(2 * b + le, 4 * b, 4 * b, cfg.use_attention)
        self.norm_out = ChannelNorm(4 * b)
        self.conv_out = CausalConv3d(4 * b, 2 * cfg.latent_dim, 3, padding=1)
        # constant filters, registered last to keep the released state-dict order
        self.wavelet_transform_in = HaarWaveletTransform3D()
        self.wavelet_transform_l1 = HaarWaveletTransform2D()
        self.wavelet_transform_l2 = HaarWaveletTransform3D()

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None, coefficients: bool = False):
        """x (B,3,T,H,W), float or uint8 -> moments (B,2z,t,h,w); with coefficients=True also the
        level-1 and level-2 wavelet coefficients (what the golden tests compare).

        With a cache, x is the next chunk of a clip: its first frame alone or with 4k more, then
        multiples of 4 frames.
        """
        first = cache is None or not cache.seen(self)
        coeffs, l1_coeffs, l2_coeffs = kernels.haar_pyramid(x, causal_pad=first, dtype=self.conv_out.conv.weight.dtype,
                                                            memory_format=conv_layout(self.down1[0].weight))
        h = self.down1(coeffs, cache)
        h = self.down2(torch.cat([h, self.connect_l1(l1_coeffs)], dim=1), cache)   # energy flow, level 1
        h = self.mid(torch.cat([h, self.connect_l2(l2_coeffs)], dim=1), cache)     # energy flow, level 2
        moments = self.conv_out.of_norm(self.norm_out, h, cache)
        return (moments, l1_coeffs, l2_coeffs) if coefficients else moments
