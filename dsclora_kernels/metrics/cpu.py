"""The ``"cpp"`` backend of ``rgb_to_y`` / ``ssim_mean``: ``dsclora_kernels._metrics``
(csrc/cpu/metrics.cpp) on float64 numpy planes."""
import numpy as np
import torch

from .. import _extension, _native
from .reference import C1, C2, gaussian_window

NAME, EXTENSION = "cpp", "metrics"


def status(device: torch.device) -> str:
    return _extension.cpu_status(EXTENSION, device)


def unsupported(*planes: np.ndarray) -> None:
    return None


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 RGB with 0-255 samples -> (H, W) float64 Y."""
    out = np.empty(img.shape[:2], dtype=np.float64)
    _native.call(EXTENSION, "rgb_to_y", _native.tensor(img, "rgb_to_y: image", torch.float64),
                 _native.tensor(out, "rgb_to_y: output", torch.float64, "contiguous"),
                 threads=torch.get_num_threads())
    return out


def ssim_mean(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM map of two (H, W) float64 planes with unit column stride."""
    return _native.call(
        EXTENSION, "ssim_mean", _native.tensor(a, "ssim: first plane", torch.float64, "rows"),
        _native.tensor(b, "ssim: second plane", torch.float64, "rows"),
        _native.tensor(gaussian_window(), "ssim: window", torch.float64, "contiguous"),
        c1=C1, c2=C2, threads=torch.get_num_threads(),
    )
