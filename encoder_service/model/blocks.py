"""WF-VAE building blocks (spec section 4). Every block takes (x, cache) with x (B, C, T, H, W).

Attribute names mirror the released state-dict keys, e.g. `norm1.norm.weight`, `conv1.conv.weight`.
"""
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from encoder_service.model.cache import CausalCache, with_causal_context


class Sequence(nn.ModuleList):
    """Layers applied in order, each given the causal cache (keys `<name>.0`, `<name>.1`, ... as released)."""

    def forward(self, x, cache: CausalCache | None = None):
        for layer in self:
            x = layer(x, cache)
        return x


class FrameConv2d(nn.Conv2d):
    """A 2D convolution applied to every frame on its own (keys `<name>.weight`, `.bias`)."""

    def forward(self, x, cache=None):
        return F.conv3d(x, self.weight.unsqueeze(2), self.bias, stride=(1, *self.stride),
                        padding=(0, *self.padding))


class CausalConv3d(nn.Module):
    """3D convolution that only looks back in time; frames before 0 are frame 0 repeated."""

    def __init__(self, cin, cout, kernel=3, stride=1, padding=1, bias=True):
        super().__init__()
        self.kernel_t, self.stride_t = kernel, stride
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, padding, padding), bias=bias)

    def forward(self, x, cache: CausalCache | None = None):
        if self.kernel_t > 1:
            x = with_causal_context(x, self, cache, self.kernel_t, self.stride_t)
        return self.conv(x)


class ChannelNorm(nn.Module):
    """LayerNorm over channels at every position (eps 1e-6), optionally fused with SiLU."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x, silu=False):
        return kernels.channel_layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps, silu)


class _ResnetBlock(nn.Module):
    """h = conv2(silu(norm2(conv1(silu(norm1(x)))))), out = shortcut(x) + h."""

    def __init__(self, cin, cout, conv, shortcut):
        super().__init__()
        self.norm1, self.conv1 = ChannelNorm(cin), conv(cin, cout)
        self.norm2, self.conv2 = ChannelNorm(cout), conv(cout, cout)
        if cin != cout:
            self.nin_shortcut = shortcut(cin, cout)

    def forward(self, x, cache=None):
        h = self.conv1(self.norm1(x, silu=True), cache)
        h = self.conv2(self.norm2(h, silu=True), cache)
        skip = self.nin_shortcut(x, cache) if hasattr(self, "nin_shortcut") else x
        return skip + h


class ResnetBlock2D(_ResnetBlock):
    def __init__(self, cin, cout):
        super().__init__(cin, cout, lambda i, o: FrameConv2d(i, o, 3, padding=1),
                         lambda i, o: FrameConv2d(i, o, 1))


class ResnetBlock3D(_ResnetBlock):
    def __init__(self, cin, cout):
        super().__init__(cin, cout, lambda i, o: CausalConv3d(i, o, 3, padding=1),
                         lambda i, o: CausalConv3d(i, o, 1, padding=0))


# At most this many bytes of attention scores exist at once (float32 upper bound): the query
# positions of a frame are processed in blocks, so attention memory is O(positions), not O(N^2).
SCORE_BYTES = 256 << 20


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_bytes: int = SCORE_BYTES):
    """Exact softmax(q k^T / sqrt(d)) v for (frames, 1, N, d) tensors, queries in blocks.

    4-D inputs let CUDA pick a memory-efficient SDPA kernel (3-D ones fall back to the math path,
    which materialises every N x N score matrix; head dim 512/768 rules out FlashAttention);
    should the math path run anyway, the blocks bound what it materialises."""
    frames, _, n, _ = q.shape
    rows = max(1, score_bytes // (4 * frames * n))
    if rows >= n:
        return F.scaled_dot_product_attention(q, k, v)
    out = torch.empty_like(q)
    for start in range(0, n, rows):
        out[:, :, start:start + rows] = F.scaled_dot_product_attention(q[:, :, start:start + rows], k, v)
    return out


class Attention(nn.Module):
    """Single-head spatial self-attention inside each frame (official `AttnBlock3DFix`)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = ChannelNorm(channels)
        self.q, self.k, self.v, self.proj_out = (CausalConv3d(channels, channels, 1, padding=0) for _ in range(4))

    def forward(self, x, cache=None):
        b, c, t, h, w = x.shape
        n = self.norm(x)

        def tokens(conv):  # (B, C, T, H, W) -> (B*T, 1 head, H*W, C)
            return conv(n).permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)

        o = blocked_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        o = o.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return x + self.proj_out(o)


class MidBlock(Sequence):
    """ResNet block, spatial attention (if the config uses it), ResNet block: `cin -> width -> cout`."""

    def __init__(self, cin: int, width: int, cout: int, use_attention: bool):
        super().__init__([ResnetBlock3D(cin, width), *([Attention(width)] if use_attention else []),
                          ResnetBlock3D(width, cout)])


class Downsample(nn.Module):
    """Per-frame 2x spatial downsample: zero-pad right/bottom by one, 3x3 conv stride 2."""

    def __init__(self, channels):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x, cache=None):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Spatial2xTime2x3DDownsample(nn.Module):
    """2x in time (causal) and space: zero-pad right/bottom by one, causal 3x3x3 conv stride 2."""

    def __init__(self, channels):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x, cache=None):
        return self.conv(F.pad(x, (0, 1, 0, 1)), cache)


class Upsample(nn.Module):
    """Per-frame 2x nearest-neighbour spatial upsample, then 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, 3, padding=1)

    def forward(self, x, cache=None):
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))


class Spatial2xTime2x3DUpsample(nn.Module):
    """2x in time and space, then a causal 3x3x3 conv: T frames -> 2T-1 frames.

    Frame 0 is only upsampled in space. Frames y_0..y_{n-1} = input 1..T-1 are interpolated in
    time linearly with half-pixel centres (out[2j] = y_{j-1}/4 + 3y_j/4, out[2j+1] = 3y_j/4 +
    y_{j+1}/4, edges clamped), so out[2j+1] needs the next frame: in streaming mode (`final`
    False) the last frame's second output is held back in the cache until the next chunk or the
    final call, which makes the output lag the input by one frame at this rate.
    """

    def __init__(self, channels):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, padding=1)

    def forward(self, x, cache: CausalCache | None = None, final: bool = True):
        pending = cache.get(self) if cache is not None else None
        out = []
        if pending is None:  # clip start: frame 0 bypasses temporal interpolation
            out.append(x[:, :, :1])
            x, pending = x[:, :, 1:], x[:, :, :0]
        if pending.shape[2] == 0:
            out.append(x[:, :, :1])  # out[0] = y_0
        ys = torch.cat([pending, x], dim=2)
        if ys.shape[2] > 1:
            a, b = ys[:, :, :-1], ys[:, :, 1:]
            out.append(torch.stack((0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b), dim=3).flatten(2, 3))
        if final:
            out.append(ys[:, :, -1:])  # the right edge clamps to the last frame
        if cache is not None:
            cache.put(self, ys[:, :, -1:].clone())
        h = torch.cat(out, dim=2)
        if h.shape[2] == 0:
            return None
        h = F.interpolate(h, scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)
        return self.conv(h, cache)

    def flush(self, cache: CausalCache):
        """End of a stream: emit the frame held back for the look-ahead (None if there is none)."""
        pending = cache.get(self)
        return self.forward(pending[:, :, :0], cache, final=True) if pending is not None else None
