"""Benchmark evaluation of an SR model on a folder of HR images (the protocol of the
reference numbers): HR mod-cropped to the scale; LR = bicubic ``imresize`` of HR rounded
to uint8 (or read from a folder); SR clamped, x255, rounded; PSNR/SSIM on Y with
border = scale.
"""
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import metrics
from .data import image_to_tensor, imresize, list_images, load_image, mod_crop, pair_lr_files


@dataclass
class ImagePair:
    """One benchmark image: ``hr`` (H, W, 3) and ``lr`` (H/s, W/s, 3), float64 0-255 integer values."""

    name: str
    hr: np.ndarray
    lr: np.ndarray


def _to_levels(rgb: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> float64 0-255 integer levels (8-bit quantisation)."""
    return np.round(np.clip(rgb.astype(np.float64), 0, 1) * 255)


def load_pairs(hr_dir, lr_dir=None, scale: int = 4) -> list[ImagePair]:
    """HR images of ``hr_dir`` (mod-cropped, grey expanded to RGB) with their LR images.

    Without ``lr_dir`` the LR is ``round(clip(imresize(HR, 1/scale) * 255))``. With it, LR files
    are paired by ``dsclora.data.pair_lr_files`` (``baby.png`` with ``baby.png``, ``babyx4.png`` or ``baby_x4.png``).
    """
    hr_paths = list_images(hr_dir)
    lr_paths = pair_lr_files(hr_paths, lr_dir, scale) if lr_dir is not None else [None] * len(hr_paths)
    pairs = []
    for hr_path, lr_path in zip(hr_paths, lr_paths):
        hr = mod_crop(_to_levels(load_image(hr_path).rgb), scale)
        if lr_dir is None:
            lr = _to_levels(imresize(hr / 255.0, 1 / scale))
        else:
            lr = _to_levels(load_image(lr_path).rgb)
            expected = (hr.shape[0] // scale, hr.shape[1] // scale, 3)
            if lr.shape != expected:
                raise ValueError(
                    f"{lr_path}: LR shape {lr.shape} does not match {hr_path.name} "
                    f"(mod-cropped HR {hr.shape} / {scale} = {expected})"
                )
        pairs.append(ImagePair(hr_path.name, hr, lr))
    return pairs


def evaluate_pairs(
    model: Callable[[torch.Tensor], torch.Tensor],
    pairs: list[ImagePair],
    scale: int = 4,
    border: int | None = None,
    channel: str = "y",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Mean and per-image PSNR/SSIM of ``model`` on ``pairs`` (see ``evaluate_folder``)."""
    from tqdm import tqdm

    border = scale if border is None else border
    images = []
    # disable=None: the bar shows only on a terminal; delay: only on runs longer than a second.
    for pair in tqdm(pairs, desc="evaluating", unit="img", disable=None if progress else True, delay=1.0):
        lr = image_to_tensor(pair.lr / 255.0).to(device)
        with torch.inference_mode():
            sr = model(lr)
        expected = (1, 3, lr.shape[2] * scale, lr.shape[3] * scale)
        if tuple(sr.shape) != expected:
            raise ValueError(f"{pair.name}: model output has shape {tuple(sr.shape)}, expected {expected}")
        sr = metrics.quantize(sr)[0].permute(1, 2, 0).to("cpu", torch.float64).numpy()
        images.append({
            "name": pair.name,
            "psnr": metrics.psnr(sr, pair.hr, border, channel),
            "ssim": metrics.ssim(sr, pair.hr, border, channel),
        })
    return {
        "psnr": float(np.mean([im["psnr"] for im in images])),
        "ssim": float(np.mean([im["ssim"] for im in images])),
        "n": len(images),
        "images": images,
    }


def evaluate_folder(
    model: Callable[[torch.Tensor], torch.Tensor],
    hr_dir,
    lr_dir=None,
    scale: int = 4,
    border: int | None = None,
    channel: str = "y",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Benchmark ``model`` on the HR images of ``hr_dir``.

    ``model`` maps (1, 3, h, w) in [0, 1] on ``device`` to (1, 3, h*scale, w*scale) (put it
    on ``device`` yourself). ``border`` defaults to ``scale``; ``channel`` is "y" or "rgb".
    Returns ``{"psnr": mean, "ssim": mean, "n": count, "images": [{"name", "psnr", "ssim"}]}``.
    """
    pairs = load_pairs(hr_dir, lr_dir, scale)
    return evaluate_pairs(model, pairs, scale, border, channel, device, progress)
