"""MATLAB-compatible bicubic ``imresize`` (SPEC §6), for numpy images and torch batches.

MATLAB's algorithm, written from its description: cubic kernel with a = -0.5; when
shrinking by a factor f the kernel is stretched by f and scaled by 1/f (antialiasing);
output size ceil(in * scale); rows (H) first, then columns (W); out-of-range taps are
mirrored half-sample symmetrically; each output's weights are normalised to sum 1 and
taps whose weight is zero for every output are dropped.
"""
import math

import numpy as np
import torch

CUBIC_A = -0.5


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (support [-2, 2])."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (CUBIC_A + 2) * ax3 - (CUBIC_A + 3) * ax2 + 1
    far = CUBIC_A * ax3 - 5 * CUBIC_A * ax2 + 8 * CUBIC_A * ax - 4 * CUBIC_A
    return np.where(ax <= 1, near, np.where(ax <= 2, far, 0.0))


def output_length(in_length: int, scale: float) -> int:
    """ceil(in_length * scale), robust to the float error of scales such as 1/3."""
    return max(1, math.ceil(in_length * scale - 1e-9))


def contributions(in_length: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights (out, taps) float64 and 0-based source indices (out, taps) of a 1-D resize."""
    out_length = output_length(in_length, scale)
    antialias = scale < 1
    width = 4.0 / scale if antialias else 4.0
    # Output pixel i (1-based) sits at u in input coordinates (1-based, pixel centres).
    u = np.arange(1, out_length + 1, dtype=np.float64) / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = math.ceil(width) + 2
    indices = left[:, None] + np.arange(taps)[None, :]  # 1-based, may fall outside
    distance = u[:, None] - indices
    weights = scale * cubic(scale * distance) if antialias else cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    # Half-sample symmetric mirroring: ... 2 1 | 1 2 ... n | n n-1 ...
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    indices = mirror[(indices.astype(np.int64) - 1) % (2 * in_length)]
    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], indices[:, keep]


def resize_matrix(in_length: int, scale: float) -> np.ndarray:
    """Dense (out, in) float64 matrix M of the 1-D resize: out = M @ in."""
    weights, indices = contributions(in_length, scale)
    matrix = np.zeros((weights.shape[0], in_length))
    np.add.at(matrix, (np.arange(weights.shape[0])[:, None], indices), weights)
    return matrix


def _resize_axis_numpy(img: np.ndarray, scale: float, axis: int) -> np.ndarray:
    weights, indices = contributions(img.shape[axis], scale)
    moved = np.moveaxis(img, axis, 0)
    expand = (slice(None),) + (None,) * (moved.ndim - 1)
    out = sum(weights[:, t][expand] * moved[indices[:, t]] for t in range(weights.shape[1]))
    return np.moveaxis(out, 0, axis)


def imresize(img, scale: float):
    """Bicubic resize by ``scale`` (e.g. 1/4 to make x4 LR), MATLAB ``imresize`` semantics.

    numpy (H, W) or (H, W, C): computed in float64; returned in the input's float dtype
    (float64 for integer input, which is resized as its values, not rounded).
    torch (..., H, W), e.g. (B, C, H, W), on any device: computed in the input's float dtype
    (float32 for integer input) with two matrix products. Output spatial size
    ceil(H * scale) x ceil(W * scale).
    """
    if scale <= 0:
        raise ValueError(f"imresize: scale must be positive, got {scale}")
    if isinstance(img, torch.Tensor):
        if img.ndim < 2:
            raise ValueError(f"imresize: tensor must be (..., H, W), got shape {tuple(img.shape)}")
        x = img if img.is_floating_point() else img.float()
        rows = torch.from_numpy(resize_matrix(x.shape[-2], scale)).to(x.device, x.dtype)
        cols = torch.from_numpy(resize_matrix(x.shape[-1], scale)).to(x.device, x.dtype)
        return rows @ x @ cols.T
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize: array must be (H, W) or (H, W, C), got shape {img.shape}")
    out_dtype = img.dtype if np.issubdtype(img.dtype, np.floating) else np.float64
    out = _resize_axis_numpy(img.astype(np.float64), scale, axis=0)
    out = _resize_axis_numpy(out, scale, axis=1)
    return out.astype(out_dtype, copy=False)


def mod_crop(img, scale: int):
    """Crop H and W down to multiples of ``scale`` (top-left kept).

    numpy (H, W[, C]) or torch (..., H, W).
    """
    if isinstance(img, torch.Tensor):
        h, w = img.shape[-2:]
        return img[..., : h - h % scale, : w - w % scale]
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]
