"""Reconstruction quality: PSNR and SSIM on videos in [-1, 1] (B, 3, T, H, W)."""
import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB on the [0, 1] scale."""
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2).item()
    return float("inf") if mse == 0 else -10.0 * torch.log10(torch.tensor(mse)).item()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM over frames and channels (Gaussian window, the usual constants, [0, 1] scale)."""
    x = ((a.clamp(-1, 1) + 1) / 2).double().transpose(1, 2).flatten(0, 2).unsqueeze(1)  # (B*T*3, 1, H, W)
    y = ((b.clamp(-1, 1) + 1) / 2).double().transpose(1, 2).flatten(0, 2).unsqueeze(1)
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - window // 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]

    def blur(t):
        return F.conv2d(t, kernel)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean().item()
