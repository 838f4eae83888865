"""WF-VAE decoder (spec section 6): the main path plus two energy-flow branches that rebuild the
wavelet pyramid and add it back in at levels 2 and 1.

The mid block and the up2 stage end in a ResNet block that emits the main channels followed by
the flow channels of the next branch (`split_flow`). Streaming (a cache, latents in pieces) needs
two things the whole-clip pass does not: the temporal upsampler holds back one frame until it
sees the next one (its `flush` ends a stream), and the level-2 flow output waits in the cache for
the main-path frames it belongs to (`_aligned`).
"""
import torch
from torch import nn

from encoder_service.model.blocks import (
    CausalConv3d,
    ChannelNorm,
    FrameConv2d,
    MidBlock,
    ResnetBlock3D,
    Sequence,
    Spatial2xTime2x3DUpsample,
    Upsample,
)
from encoder_service.model.cache import CausalCache
from encoder_service.model.config import WFVAEConfig
from encoder_service.model.wavelet import InverseHaarWaveletTransform2D, InverseHaarWaveletTransform3D


def flow_branch(ld: int, cout: int, num_res: int) -> Sequence:
    """ResNet blocks on the flow channels, then the conv to wavelet coefficients."""
    return Sequence([*(ResnetBlock3D(ld, ld) for _ in range(num_res)), FrameConv2d(ld, cout, 3, padding=1)])


class TemporalUpStage(Sequence):
    """up2: `n` ResNet blocks, the 2x time + space upsampler, then a ResNet block that also emits
    the level-1 flow channels (keys up2.0 ... up2.<n+1>, as released)."""

    def __init__(self, channels: int, flow: int, n: int):
        super().__init__([*(ResnetBlock3D(channels, channels) for _ in range(n)), Spatial2xTime2x3DUpsample(channels),
                          ResnetBlock3D(channels, channels + flow)])

    @property
    def upsampler(self) -> Spatial2xTime2x3DUpsample:
        return self[-2]

    def before_upsampler(self, x, cache):
        for block in list(self)[:-2]:  # (slicing a ModuleList subclass would construct one)
            x = block(x, cache)
        return x

    def after_upsampler(self, x, cache):
        return self[-1](x, cache)


class Decoder(nn.Module):
    def __init__(self, cfg: WFVAEConfig):
        super().__init__()
        b, ld, n = cfg.base_channels, cfg.decoder_energy_flow_hidden_size, cfg.decoder_num_resblocks
        self.main_channels = 4 * b
        self.conv_in = CausalConv3d(cfg.latent_dim, 4 * b, 3, padding=1)
        self.mid = MidBlock(4 * b, 4 * b, 4 * b + ld, cfg.use_attention)
        self.up2 = TemporalUpStage(4 * b, ld, n)
        self.up1 = Sequence([ResnetBlock3D(4 * b, 2 * b), *(ResnetBlock3D(2 * b, 2 * b) for _ in range(n - 1)),
                             Upsample(2 * b), ResnetBlock3D(2 * b, 2 * b)])
        self.layer = Sequence([ResnetBlock3D(2 * b, b), ResnetBlock3D(b, b)])
        self.connect_l1 = flow_branch(ld, 12, cfg.connect_res_layer_num)
        self.connect_l2 = flow_branch(ld, 24, cfg.connect_res_layer_num)
        self.norm_out = ChannelNorm(b)
        self.conv_out = FrameConv2d(b, 24, 3, padding=1)
        self.inverse_wavelet_transform_out = InverseHaarWaveletTransform3D()
        self.inverse_wavelet_transform_l1 = InverseHaarWaveletTransform2D()
        self.inverse_wavelet_transform_l2 = InverseHaarWaveletTransform3D()

    def split_flow(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(main channels, flow channels) of a block output that carries both."""
        return h[:, :self.main_channels], h[:, self.main_channels:]

    def forward(self, z: torch.Tensor | None, cache: CausalCache | None = None, final: bool = True,
                coefficients: bool = False):
        """z (B,z,t,h,w) -> video (B,3,4t-3,8h,8w); with coefficients=True also the level-1 and
        level-2 coefficients (what the golden tests compare).

        Streaming (with a cache): each call takes the next latent frames and returns the video
        frames that are final (the last two of a chunk come with the next call, or the final one;
        z=None ends a stream). Returns None when a call has no frames to give.
        """
        if z is None:
            h, l2, l2_coeffs = self.up2.upsampler.flush(cache), None, None
        else:
            h, flow = self.split_flow(self.mid(self.conv_in(z, cache), cache))
            l2_coeffs = self.connect_l2(flow, cache)
            l2 = self.inverse_wavelet_transform_l2(l2_coeffs, cache)
            h = self.up2.upsampler(self.up2.before_upsampler(h, cache), cache, final)
        l2 = self._aligned(l2, h, cache)
        if h is None:
            return None
        h, flow = self.split_flow(self.up2.after_upsampler(h, cache))
        l1_coeffs = self.connect_l1(flow, cache)
        l1_coeffs = torch.cat([l1_coeffs[:, :3] + l2, l1_coeffs[:, 3:]], dim=1)  # level-2 flow joins the low band
        l1 = self.inverse_wavelet_transform_l1(l1_coeffs)
        h = self.conv_out(self.norm_out(self.layer(self.up1(h, cache), cache), silu=True))
        # the level-1 flow joins the low band inside the inverse transform (no concatenated copy)
        video = self.inverse_wavelet_transform_out(h, cache, add_low=l1)
        return (video, l1_coeffs, l2_coeffs) if coefficients else video

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
