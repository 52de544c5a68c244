"""Y conversion and SSIM of float64 numpy planes: C++ (``_metrics``) or numpy reference.

The numpy functions ``*_reference`` are the specification (SPEC §7, BasicSR's formulas);
``rgb_to_y`` and ``ssim_mean`` dispatch to the compiled kernels on the CPU and fall back
to the reference, logged once, when the extension is not built.
"""
import numpy as np
import torch

from . import _dispatch, _native
from ._log import fallback

WINDOW_SIZE, WINDOW_SIGMA = 11, 1.5
#: SSIM stabilisers for 0-255 samples: (0.01 * 255)^2 and (0.03 * 255)^2.
C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
#: BT.601 luma weights of R, G, B (on [0, 1] samples) and offset, BasicSR's ``rgb2ycbcr``.
Y_WEIGHTS, Y_OFFSET = (65.481, 128.553, 24.966), 16.0


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA) -> np.ndarray:
    """1-D Gaussian (size,) float64 summing to 1; the SSIM window is its outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def rgb_to_y_reference(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 RGB with 0-255 samples -> (H, W) float64 Y (16..235 scale)."""
    r, g, b = (img[..., c] / 255.0 for c in range(3))
    return Y_OFFSET + Y_WEIGHTS[0] * r + Y_WEIGHTS[1] * g + Y_WEIGHTS[2] * b


def _correlate_valid(x: np.ndarray, window: np.ndarray, axis: int) -> np.ndarray:
    """'Valid' correlation of x with the 1-D window along ``axis``."""
    n = x.shape[axis] - window.size + 1
    return sum(w * x.take(range(t, t + n), axis=axis) for t, w in enumerate(window))


def ssim_mean_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM map of two (H, W) float64 planes with 0-255 samples."""
    window = gaussian_window()

    def blur(x):
        return _correlate_valid(_correlate_valid(x, window, 0), window, 1)

    mu_a, mu_b = blur(a), blur(b)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a, var_b, cov = blur(a * a) - mu_aa, blur(b * b) - mu_bb, blur(a * b) - mu_ab
    ssim_map = ((2 * mu_ab + C1) * (2 * cov + C2)) / ((mu_aa + mu_bb + C1) * (var_a + var_b + C2))
    return float(ssim_map.mean())


def _backend(op: str) -> str:
    backend = _dispatch.choose(op, "metrics", torch.device("cpu"))
    if backend == "triton":  # numpy arrays live on the CPU; there is no Triton kernel for them
        fallback(f"{op}:triton", "no Triton kernel for numpy metrics; using the numpy reference")
    return backend


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
    if _backend("rgb_to_y") != "cpp":
        return rgb_to_y_reference(img)
    out = np.empty(img.shape[:2], dtype=np.float64)
    _native.call("metrics", "rgb_to_y", _native.tensor(img, "rgb_to_y: image", torch.float64),
                 _native.tensor(out, "rgb_to_y: output", torch.float64, "contiguous"),
                 threads=torch.get_num_threads())
    return out


def ssim_mean(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM map of two (H, W) planes with 0-255 samples (float64 arithmetic)."""
    a, b = _check_plane(a, "first plane"), _check_plane(b, "second plane")
    if a.shape != b.shape:
        raise ValueError(f"ssim: plane shapes differ: {a.shape} vs {b.shape}")
    if min(a.shape) < WINDOW_SIZE:
        raise ValueError(f"ssim: planes of shape {a.shape} are smaller than the {WINDOW_SIZE}x{WINDOW_SIZE} window")
    if _backend("ssim") != "cpp":
        return ssim_mean_reference(a, b)
    return _native.call(
        "metrics", "ssim_mean", _native.tensor(a, "ssim: first plane", torch.float64, "rows"),
        _native.tensor(b, "ssim: second plane", torch.float64, "rows"),
        _native.tensor(gaussian_window(), "ssim: window", torch.float64, "contiguous"),
        c1=C1, c2=C2, threads=torch.get_num_threads(),
    )
