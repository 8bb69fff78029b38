"""Image quality metrics in torch: PSNR and SSIM of video frames.

Videos are ``[..., 3, T, H, W]`` or ``[T, H, W, 3]``-free tensors in a known data range; SSIM is the
standard single-scale SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5),
``K1=0.01, K2=0.03``, computed per frame and channel with valid (unpadded) windows, then averaged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements (``inf`` for identical inputs)."""
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if data_range <= 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range}")
    mse = float(((x.double() - y.double()) ** 2).mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # [1, 1, size, size]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two image stacks ``[..., H, W]`` (every leading index is one grey image).

    Frames smaller than the window use a window of the frame's smaller side (odd).
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() < 2:
        raise ValueError(f"ssim: need at least [H, W], got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    size = min(window, H, W)
    size -= (size + 1) % 2  # odd
    xs = x.reshape(-1, 1, H, W).double()
    ys = y.reshape(-1, 1, H, W).double()
    w = _gaussian_window(size, sigma, torch.float64, xs.device)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x = F.conv2d(xs, w)
    mu_y = F.conv2d(ys, w)
    sxx = F.conv2d(xs * xs, w) - mu_x**2
    syy = F.conv2d(ys * ys, w) - mu_y**2
    sxy = F.conv2d(xs * ys, w) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return float((num / den).mean())


def video_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> float:
    """SSIM of videos ``[B, C, T, H, W]`` (or ``[C, T, H, W]``): mean over batch, channel and frame."""
    return ssim(x, y, data_range=data_range)
