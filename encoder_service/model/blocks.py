"""WF-VAE building blocks (spec section 4). Every block takes (x, cache) with x (B, C, T, H, W).

Attribute names mirror the released state-dict keys, e.g. `norm1.norm.weight`, `conv1.conv.weight`.
"""
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from encoder_service.model.cache import CausalCache, keep_context


class Sequence(nn.ModuleList):
    """Layers applied in order, each given the causal cache (keys `<name>.0`, `<name>.1`, ... as released).
    A ResNet block followed by a downsampler writes its sum straight into the downsampler's padded
    input (no padded copy)."""

    def forward(self, x, cache: CausalCache | None = None):
        layers, i = list(self), 0
        while i < len(layers):
            layer, after = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, _ResnetBlock) and isinstance(after, _Downsampler):
                shape = (x.shape[0], layer.cout, *x.shape[2:])
                x, i = after.fed(lambda out=None, x=x, block=layer: block(x, cache, out=out), shape, x, cache), i + 2
            else:
                x, i = layer(x, cache), i + 1
        return x


def conv_layout(weight: torch.Tensor) -> torch.memory_format:
    """The memory format a convolution runs in: channels-last when its weight is (cuDNN converts
    an input in the other format inside the call, a copy of the whole input)."""
    w = weight if weight.ndim == 5 else weight.unsqueeze(2)
    last = w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()
    return torch.channels_last_3d if last else torch.contiguous_format


class ConvInput:
    """A convolution's input allocated whole, in the conv's layout, with room for `context` frames
    before the chunk's own and for one zero row and column at the right and bottom (`pad`): the
    layer that produces the input writes it into `frames`, so the context and the padding cost no
    concatenated or padded copy of the input.

    Producers are functions `produce(out=None)`: they write into `out` and return it, or return
    a new tensor when out is None, which is what runs under autograd (in-place writes into a shared
    buffer are not differentiable): there the input is padded and concatenated as before."""

    def __init__(self, shape, like: torch.Tensor, layout: torch.memory_format, context: int = 0, pad: int = 0):
        b, c, t, h, w = shape
        self.tensor = torch.empty((b, c, context + t, h + pad, w + pad), dtype=like.dtype, device=like.device,
                                  memory_format=layout)
        self.frames = self.tensor[:, :, context:, :h, :w]
        self.context = self.tensor[:, :, :context]
        if pad:
            self.tensor[:, :, :, h:].zero_()
            self.tensor[:, :, :, :h, w:].zero_()


def copied(x: torch.Tensor):
    """The producer (see ConvInput) of a tensor that already exists: copied into the buffer."""
    return lambda out=None: x if out is None else out.copy_(x)


class FrameConv2d(nn.Conv2d):
    """A 2D convolution applied to every frame on its own (keys `<name>.weight`, `.bias`)."""

    def forward(self, x, cache=None):
        return F.conv3d(x, self.weight.unsqueeze(2), self.bias, stride=(1, *self.stride),
                        padding=(0, *self.padding))

    def of_norm(self, norm: "ChannelNorm", x, cache=None):
        """conv(silu(norm(x)))."""
        return self(norm(x, silu=True), cache)


class CausalConv3d(nn.Module):
    """3D convolution that only looks back in time; frames before 0 are frame 0 repeated.

    Its input is a ConvInput holding the causal context in front of the chunk's frames: on a
    clip's first chunk kernel_t-1 copies of frame 0 (the official causal padding), on later ones
    the padded input the previous chunk had not consumed yet (kept in the cache: the last
    kernel_t-stride_t frames for the chunk lengths the model uses). This one rule makes chunked
    inference equal whole-clip inference for every causal layer."""

    def __init__(self, cin, cout, kernel=3, stride=1, padding=1, bias=True):
        super().__init__()
        self.kernel_t, self.stride_t = kernel, stride
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, padding, padding), bias=bias)

    def forward(self, x, cache: CausalCache | None = None):
        if self.kernel_t == 1:
            return self.conv(x)
        return self.fed(copied(x), x.shape, x, cache)

    def of_norm(self, norm: "ChannelNorm", x, cache=None):
        """conv(silu(norm(x))), the norm writing straight into this conv's input."""
        if self.kernel_t == 1:
            return self.conv(norm(x, silu=True))
        return self.fed(lambda out=None: norm(x, silu=True, out=out), x.shape, x, cache)

    def fed(self, produce, shape, like: torch.Tensor, cache: CausalCache | None, pad: int = 0):
        """The conv of the input produce(out) writes into `out` (a view of `shape`, see ConvInput),
        with `pad` zero rows and columns at the right and bottom."""
        context = cache.get(self) if cache is not None else None
        n = self.kernel_t - 1 if context is None else context.shape[2]
        if torch.is_grad_enabled():
            padded = F.pad(produce(), (0, pad, 0, pad))
            padded = torch.cat([padded[:, :, :1].expand(-1, -1, n, -1, -1) if context is None else context, padded], 2)
        else:
            inp = ConvInput(shape, like, conv_layout(self.conv.weight), n, pad)
            produce(inp.frames)
            if context is None:  # frame 0 repeated (with its zero border)
                inp.context.copy_(inp.tensor[:, :, n:n + 1].expand_as(inp.context))
            else:
                inp.context.copy_(context)
            padded = inp.tensor
        keep_context(padded, self, cache, self.kernel_t, self.stride_t)
        return self.conv(padded)


class ChannelNorm(nn.Module):
    """LayerNorm over channels at every position (eps 1e-6), optionally fused with SiLU."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x, silu=False, out=None):
        return kernels.channel_layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps, silu, out)


class _ResnetBlock(nn.Module):
    """h = conv2(silu(norm2(conv1(silu(norm1(x)))))), out = shortcut(x) + h."""

    def __init__(self, cin, cout, conv, shortcut):
        super().__init__()
        self.cout = cout
        self.norm1, self.conv1 = ChannelNorm(cin), conv(cin, cout)
        self.norm2, self.conv2 = ChannelNorm(cout), conv(cout, cout)
        if cin != cout:
            self.nin_shortcut = shortcut(cin, cout)

    def forward(self, x, cache=None, out=None):
        """out: where to write the sum (the next layer's input buffer), else a new tensor."""
        h = self.conv1.of_norm(self.norm1, x, cache)
        h = self.conv2.of_norm(self.norm2, h, cache)
        skip = self.nin_shortcut(x, cache) if hasattr(self, "nin_shortcut") else x
        if out is None:
            return skip + h
        if torch.compiler.is_compiling():  # dynamo refuses a strided out=; inductor fuses this into one write
            return out.copy_(skip + h)
        return torch.add(skip, h, out=out)  # (out is None under autograd: see ConvInput)


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


class _Downsampler(nn.Module):
    """A stride-2 conv of the input zero-padded by one at the right and bottom. `fed(write, ...)`
    lets the previous layer write the input into the padded buffer; forward(x) copies x there."""

    def forward(self, x, cache=None):
        return self.fed(copied(x), x.shape, x, cache)


class Downsample(_Downsampler):
    """Per-frame 2x spatial downsample: zero-pad right/bottom by one, 3x3 conv stride 2."""

    def __init__(self, channels):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, 3, stride=2, padding=0)

    def fed(self, produce, shape, like, cache=None):
        if torch.is_grad_enabled():
            return self.conv(F.pad(produce(), (0, 1, 0, 1)))
        inp = ConvInput(shape, like, conv_layout(self.conv.weight), pad=1)
        produce(inp.frames)
        return self.conv(inp.tensor)


class Spatial2xTime2x3DDownsample(_Downsampler):
    """2x in time (causal) and space: zero-pad right/bottom by one, causal 3x3x3 conv stride 2."""

    def __init__(self, channels):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=2, padding=0)

    def fed(self, produce, shape, like, cache=None):
        return self.conv.fed(produce, shape, like, cache, pad=1)


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
