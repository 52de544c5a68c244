"""PSNR and SSIM with the benchmark convention of BasicSR (SPEC §7).

numpy functions take one (H, W, 3) image pair with 0-255 samples (uint8 or float, e.g.
``quantize``d SR and the uint8 HR); the ``*_torch`` versions take (B, 3, H, W) batches with
0-255 samples on any device and return (B,). All arithmetic is float64.
``channel="y"`` measures the BT.601 luma (Y = 16 + 65.481 R + 128.553 G + 24.966 B on
[0, 1] samples); ``channel="rgb"`` averages over the channels. ``border`` pixels are
cropped from every side first (benchmark tables use border = scale).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from dsclora_kernels import metrics as kernel_metrics

CHANNELS = ("y", "rgb")


def quantize(sr: torch.Tensor) -> torch.Tensor:
    """SR in [0, 1] -> clamp, x255, round: the 0-255 integer values a saved image would hold."""
    return sr.clamp(0, 1).mul(255).round()


def _check_pair(sr, hr, border: int, channel: str, channel_axis: int, func: str):
    if channel not in CHANNELS:
        raise ValueError(f"{func}: channel must be one of {CHANNELS}, got {channel!r}")
    if tuple(sr.shape) != tuple(hr.shape):
        raise ValueError(f"{func}: shapes differ: sr {tuple(sr.shape)} vs hr {tuple(hr.shape)}")
    if channel == "y" and sr.shape[channel_axis] != 3:
        raise ValueError(f"{func}: channel='y' needs 3 (RGB) channels, got shape {tuple(sr.shape)}")
    if border < 0:
        raise ValueError(f"{func}: border must be >= 0, got {border}")


def _planes(sr: np.ndarray, hr: np.ndarray, border: int, channel: str, func: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cropped float64 (H, W) plane pairs to measure: [Y] or one per channel."""
    sr, hr = np.asarray(sr), np.asarray(hr)
    if sr.ndim != 3:
        raise ValueError(f"{func}: expected (H, W, C) images, got shape {sr.shape}")
    _check_pair(sr, hr, border, channel, 2, func)
    if 2 * border >= min(sr.shape[:2]):
        raise ValueError(f"{func}: border {border} leaves nothing of an image of shape {sr.shape}")
    crop = (slice(border, sr.shape[0] - border), slice(border, sr.shape[1] - border))
    sr, hr = sr[crop].astype(np.float64), hr[crop].astype(np.float64)
    if channel == "y":
        return [(kernel_metrics.rgb_to_y(sr), kernel_metrics.rgb_to_y(hr))]
    return [(sr[..., c], hr[..., c]) for c in range(sr.shape[2])]


def psnr(sr: np.ndarray, hr: np.ndarray, border: int = 0, channel: str = "y") -> float:
    """PSNR in dB of (H, W, 3) images with 0-255 samples; inf when they are equal."""
    planes = _planes(sr, hr, border, channel, "psnr")
    mse = np.mean([np.mean((a - b) ** 2) for a, b in planes])
    return math.inf if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(sr: np.ndarray, hr: np.ndarray, border: int = 0, channel: str = "y") -> float:
    """SSIM (11x11 Gaussian window, sigma 1.5, valid) of (H, W, 3) images with 0-255 samples."""
    planes = _planes(sr, hr, border, channel, "ssim")
    return float(np.mean([kernel_metrics.ssim_mean(a, b) for a, b in planes]))


def _planes_torch(sr: torch.Tensor, hr: torch.Tensor, border: int, channel: str, func: str):
    """Cropped float64 (B, P, H, W) planes: P = 1 (Y) or the channel count."""
    if sr.ndim != 4:
        raise ValueError(f"{func}: expected (B, C, H, W) batches, got shape {tuple(sr.shape)}")
    _check_pair(sr, hr, border, channel, 1, func)
    if 2 * border >= min(sr.shape[-2:]):
        raise ValueError(f"{func}: border {border} leaves nothing of a batch of shape {tuple(sr.shape)}")
    h, w = sr.shape[-2:]
    sr, hr = (x[..., border : h - border, border : w - border].double() for x in (sr, hr))
    if channel == "rgb":
        return sr, hr
    weights = torch.tensor(kernel_metrics.Y_WEIGHTS, dtype=torch.float64, device=sr.device).view(1, 3, 1, 1)

    def to_y(x):
        return kernel_metrics.Y_OFFSET + (weights * (x / 255.0)).sum(dim=1, keepdim=True)

    return to_y(sr), to_y(hr)


def psnr_torch(sr: torch.Tensor, hr: torch.Tensor, border: int = 0, channel: str = "y") -> torch.Tensor:
    """PSNR (B,) float64 of (B, 3, H, W) batches with 0-255 samples; inf where equal."""
    a, b = _planes_torch(sr, hr, border, channel, "psnr_torch")
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(255.0**2 / mse)


def ssim_torch(sr: torch.Tensor, hr: torch.Tensor, border: int = 0, channel: str = "y") -> torch.Tensor:
    """SSIM (B,) float64 of (B, 3, H, W) batches with 0-255 samples (mean over channels for rgb)."""
    a, b = _planes_torch(sr, hr, border, channel, "ssim_torch")
    if min(a.shape[-2:]) < kernel_metrics.WINDOW_SIZE:
        raise ValueError(f"ssim_torch: planes of shape {tuple(a.shape)} are smaller than the window")
    g = torch.from_numpy(kernel_metrics.gaussian_window()).to(a.device)
    planes = a.shape[1]
    # Five moments of every plane, blurred with the separable window as grouped convs.
    moments = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    groups = moments.shape[1]
    blurred = F.conv2d(moments, g.view(1, 1, -1, 1).expand(groups, 1, -1, 1), groups=groups)
    blurred = F.conv2d(blurred, g.view(1, 1, 1, -1).expand(groups, 1, 1, -1), groups=groups)
    mu_a, mu_b, e_aa, e_bb, e_ab = blurred.split(planes, dim=1)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    c1, c2 = kernel_metrics.C1, kernel_metrics.C2
    ssim_map = ((2 * mu_ab + c1) * (2 * (e_ab - mu_ab) + c2)) / ((mu_aa + mu_bb + c1) * (e_aa - mu_aa + e_bb - mu_bb + c2))
    return ssim_map.mean(dim=(1, 2, 3))
