"""Reconstruction quality: PSNR and SSIM on videos in [-1, 1] (B, 3, T, H, W).

Both run in float32 on whatever device the videos are on. SSIM's Gaussian window is separable:
two 11-tap depthwise convolutions over the four local moments (x, y, x²+y², xy) of a batch of
frame planes at once, instead of an 11x11 float64 convolution per moment, with memory bounded by
the planes per batch (benchmarks/bench_actor.py measures the speed-up; tests/test_actor.py holds
the float64 formula it equals to 1e-6)."""
import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB on the [0, 1] scale."""
    diff = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) / 2
    mse = diff.square().mean().item()
    return float("inf") if mse == 0 else -10.0 * torch.log10(torch.tensor(mse, dtype=torch.float64)).item()


def gaussian_window(window: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    g = torch.exp(-((torch.arange(window, dtype=torch.float32, device=device) - window // 2) ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5, planes: int = 12) -> float:
    """Mean SSIM over frames and channels (Gaussian window, the usual constants, [0, 1] scale),
    `planes` frame-channel planes at a time (memory stays ~20 planes' worth, whatever the length)."""
    x = ((a.float().clamp(-1, 1) + 1) / 2).transpose(1, 2).flatten(0, 2)  # (B*T*3, H, W)
    y = ((b.float().clamp(-1, 1) + 1) / 2).transpose(1, 2).flatten(0, 2)
    g = gaussian_window(window, sigma, x.device)
    total = 0.0
    for lo in range(0, len(x), planes):
        total += _ssim_map(x[lo:lo + planes], y[lo:lo + planes], g).sum().item()
    return total / (len(x) * (x.shape[-2] - window + 1) * (x.shape[-1] - window + 1))


def _ssim_map(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n, h, w = x.shape
    # SSIM needs vx + vy only as a sum: blur(x² + y²) serves both (four blurs, not five)
    moments = torch.stack([x, y, x * x + y * y, x * y], dim=1).view(1, 4 * n, h, w)  # one channel per plane
    k = len(g)
    blurred = F.conv2d(F.conv2d(moments, g.view(1, 1, 1, k).expand(4 * n, 1, 1, k), groups=4 * n),
                       g.view(1, 1, k, 1).expand(4 * n, 1, k, 1), groups=4 * n)     # separable, depthwise
    mx, my, squares, xy = blurred.view(n, 4, h - k + 1, w - k + 1).unbind(1)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mxx, myy, mxy = mx * mx, my * my, mx * my
    return ((2 * mxy + c1) * (2 * (xy - mxy) + c2)) / ((mxx + myy + c1) * (squares - mxx - myy + c2))
