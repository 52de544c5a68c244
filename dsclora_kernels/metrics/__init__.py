"""Y conversion and SSIM of float64 numpy planes: C++ (``_metrics``, ``cpu.py``) or the numpy
reference (``reference.py``, the specification: SPEC §7, BasicSR's formulas).

``rgb_to_y`` and ``ssim_mean`` run the compiled kernels on the CPU and fall back to the
reference, logged once, when the extension is not built (numpy arrays live on the CPU: there
is no Triton backend; forcing one runs the reference, logged).
"""
import numpy as np
import torch

from .. import _dispatch
from . import cpu, reference
from .reference import (  # noqa: F401 -- the package's public names
    C1, C2, WINDOW_SIGMA, WINDOW_SIZE, Y_OFFSET, Y_WEIGHTS, gaussian_window, rgb_to_y_reference, ssim_mean_reference,
)

CPU = torch.device("cpu")
#: Backends per op, fastest first (the reference ends every list).
RGB_TO_Y = _dispatch.Registry("rgb_to_y", reference, cpu=(cpu,))
SSIM = _dispatch.Registry("ssim", reference, cpu=(cpu,))


def _check_plane(x: np.ndarray, name: str) -> np.ndarray:
    """x as float64 with unit column stride (a copy only when needed)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"ssim: {name} must be an (H, W) plane, got shape {x.shape}")
    return x if x.strides[1] == 8 else np.ascontiguousarray(x)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB with 0-255 samples -> (H, W) float64 Y."""
    img = np.asarray(img, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"rgb_to_y: expected an (H, W, 3) image, got shape {img.shape}")
    return RGB_TO_Y.choose(CPU).rgb_to_y(img)


def ssim_mean(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM map of two (H, W) planes with 0-255 samples (float64 arithmetic)."""
    a, b = _check_plane(a, "first plane"), _check_plane(b, "second plane")
    if a.shape != b.shape:
        raise ValueError(f"ssim: plane shapes differ: {a.shape} vs {b.shape}")
    if min(a.shape) < WINDOW_SIZE:
        raise ValueError(f"ssim: planes of shape {a.shape} are smaller than the {WINDOW_SIZE}x{WINDOW_SIZE} window")
    return SSIM.choose(CPU).ssim_mean(a, b)
