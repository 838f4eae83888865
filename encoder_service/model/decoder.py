"""WF-VAE decoder (spec section 6): the main path plus two energy-flow branches that rebuild the
wavelet pyramid and add it back in at levels 2 and 1."""
import torch
from torch import nn

from encoder_service.model.blocks import (CausalConv3d, ChannelNorm, FrameConv2d, ResnetBlock3D,
                                          Spatial2xTime2x3DUpsample, Upsample)
from encoder_service.model.cache import CausalCache
from encoder_service.model.config import WFVAEConfig
from encoder_service.model.encoder import mid_block, run
from encoder_service.model.wavelet import InverseHaarWaveletTransform2D, InverseHaarWaveletTransform3D


def flow_branch(ld, cout, num_res):
    return nn.ModuleList([ResnetBlock3D(ld, ld) for _ in range(num_res)] + [FrameConv2d(ld, cout, 3, padding=1)])


class Decoder(nn.Module):
    def __init__(self, cfg: WFVAEConfig):
        super().__init__()
        b, ld, n = cfg.base_channels, cfg.decoder_energy_flow_hidden_size, cfg.decoder_num_resblocks
        self.width = 4 * b  # main-path channels; the last `ld` channels of up/mid outputs are flow
        self.conv_in = CausalConv3d(cfg.latent_dim, 4 * b, 3, padding=1)
        self.mid = mid_block(4 * b, 4 * b, cfg.use_attention)
        self.mid[-1] = ResnetBlock3D(4 * b, 4 * b + ld)
        self.up2 = nn.ModuleList([ResnetBlock3D(4 * b, 4 * b) for _ in range(n)]
                                 + [Spatial2xTime2x3DUpsample(4 * b), ResnetBlock3D(4 * b, 4 * b + ld)])
        self.up1 = nn.ModuleList([ResnetBlock3D(4 * b, 2 * b)] + [ResnetBlock3D(2 * b, 2 * b) for _ in range(n - 1)]
                                 + [Upsample(2 * b), ResnetBlock3D(2 * b, 2 * b)])
        self.layer = nn.ModuleList([ResnetBlock3D(2 * b, b), ResnetBlock3D(b, b)])
        self.connect_l1 = flow_branch(ld, 12, cfg.connect_res_layer_num)
        self.connect_l2 = flow_branch(ld, 24, cfg.connect_res_layer_num)
        self.norm_out = ChannelNorm(b)
        self.conv_out = FrameConv2d(b, 24, 3, padding=1)
        self.inverse_wavelet_transform_out = InverseHaarWaveletTransform3D()
        self.inverse_wavelet_transform_l1 = InverseHaarWaveletTransform2D()
        self.inverse_wavelet_transform_l2 = InverseHaarWaveletTransform3D()

    @property
    def upsampler(self) -> Spatial2xTime2x3DUpsample:
        return self.up2[-2]

    def forward(self, z: torch.Tensor | None, cache: CausalCache | None = None, final: bool = True):
        """z (B,z,t,h,w) -> (video (B,3,4t-3,8h,8w), level-1 coeffs, level-2 coeffs).

        Streaming (with a cache): each call takes the next latent frames and returns the video
        frames that are final; because of the temporal upsampler's look-ahead the last two
        frames of a chunk come with the next call, or with the final one (z=None ends a stream).
        Returns None when a call has no frames to give.
        """
        if z is None:
            h, l2, l2_coeffs = self.upsampler.flush(cache), None, None
        else:
            h, l2, l2_coeffs = self._latent_rate(z, cache, final)
        l2 = self._aligned(l2, h, cache)
        if h is None:
            return None
        h = run(self.up2[-1:], h, cache)
        l1_coeffs = run(self.connect_l1, h[:, self.width:], cache)
        l1_coeffs = torch.cat([l1_coeffs[:, :3] + l2, l1_coeffs[:, 3:]], dim=1)
        l1 = self.inverse_wavelet_transform_l1(l1_coeffs)
        h = run(self.layer, run(self.up1, h[:, :self.width], cache), cache)
        h = self.conv_out(self.norm_out(h, silu=True))
        # the level-1 flow joins the low band inside the inverse transform (no concatenated copy);
        # l1_coeffs above stays a cat because it is returned
        return self.inverse_wavelet_transform_out(h, cache, add_low=l1), l1_coeffs, l2_coeffs

    def _latent_rate(self, z, cache, final):
        """Everything before the temporal upsampler, plus the level-2 flow branch."""
        h = run(self.mid, self.conv_in(z, cache), cache)
        l2_coeffs = run(self.connect_l2, h[:, self.width:], cache)
        l2 = self.inverse_wavelet_transform_l2(l2_coeffs, cache)
        h = run(self.up2[:-2], h[:, :self.width], cache)
        return self.upsampler(h, cache, final), l2, l2_coeffs

    def _aligned(self, l2, h, cache):
        """The level-2 flow output for exactly the frames in h (the main path lags by one frame
        while streaming, so the flow frames wait in the cache)."""
        if cache is None:
            return l2
        queue = cache.get(self)
        if l2 is not None:
            queue = l2 if queue is None else torch.cat([queue, l2], dim=2)
        n = 0 if h is None else h.shape[2]
        cache.put(self, queue[:, :, n:].clone())
        return queue[:, :, :n]
