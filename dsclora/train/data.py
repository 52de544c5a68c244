"""Training patches: random aligned (LR, HR) crops whose content is a pure function of
(seed, sample index), so that a resumed or distributed run sees exactly the same data.

Sample ``g`` (global index ``iteration · batch_size + k``) takes image ``perm_e[g mod n]`` where
``perm_e`` is a seeded permutation for epoch ``e = g // n``; its crop position and augmentation come
from a generator seeded with (seed, g). LR patches are either cut from paired LR files or made on
the fly: the HR crop plus a few pixels of context is downscaled with MATLAB-compatible bicubic
(crop first, then resize: cheap) and rounded to 8-bit values like an LR file, which gives exactly
the crop of the whole image's LR (the benchmark protocol's LR).
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from dsclora.data import imresize, list_images, load_image, pair_lr_files

logger = logging.getLogger("dsclora")

#: LR pixels of context around a crop for its bicubic downscaling: the x``s`` antialiasing cubic
#: reaches 2 LR pixels (2·s HR pixels) to each side; one more for safety.
LR_MARGIN = 3


@dataclass(frozen=True)
class ImageEntry:
    """One training image: its HR file, its LR file (paired data) and its HR size."""

    hr: Path
    lr: Path | None
    height: int
    width: int


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) read from the file header only."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read as an image: {exc}") from exc


def find_images(hr_folders: list[str], lr_folders: list[str], scale: int) -> list[ImageEntry]:
    """Every image of ``hr_folders`` (with its LR file from ``lr_folders``, paired by
    ``dsclora.data.pair_lr_files``)."""
    entries = []
    for i, hr_folder in enumerate(hr_folders):
        hr_files = list_images(hr_folder)
        lr_files = pair_lr_files(hr_files, lr_folders[i], scale) if lr_folders else [None] * len(hr_files)
        for hr, lr in zip(hr_files, lr_files):
            height, width = image_size(hr)
            if lr is not None:
                lr_h, lr_w = image_size(lr)
                if (lr_h, lr_w) != (height // scale, width // scale):
                    raise ValueError(f"{lr}: LR size {lr_w}x{lr_h} does not match HR {hr.name} "
                                     f"{width}x{height} / {scale}")
            entries.append(ImageEntry(hr, lr, height, width))
    return entries


def usable_images(entries: list[ImageEntry], patch_size: int) -> list[ImageEntry]:
    """The images at least ``patch_size`` on each side; the others are skipped with a warning."""
    usable = [e for e in entries if min(e.height, e.width) >= patch_size]
    skipped = [e.hr.name for e in entries if min(e.height, e.width) < patch_size]
    if skipped:
        logger.warning("dsclora: %d training image(s) smaller than the %dx%d patch are skipped: %s",
                       len(skipped), patch_size, patch_size, ", ".join(skipped[:10]))
    if not usable:
        raise ValueError(f"no training image is at least {patch_size}x{patch_size} pixels")
    return usable


def augment(img: np.ndarray, code: int) -> np.ndarray:
    """One of the 8 flips/rotations of an (H, W, C) array: bit 0 flips H, bits 1-2 rotate by 90°."""
    if code & 1:
        img = img[::-1]
    return np.rot90(img, k=code >> 1)


class PatchDataset(Dataset):
    """Map-style dataset: index g -> (lr (3, p/s, p/s), hr (3, p, p)) float32 tensors in [0, 1]."""

    def __init__(self, entries: list[ImageEntry], scale: int, patch_size: int, seed: int,
                 augment: bool = True, quantize_lr: bool = True, cache_images: bool = False):
        if patch_size % scale:
            raise ValueError(f"patch size {patch_size} is not a multiple of the scale {scale}")
        self.entries = usable_images(entries, patch_size)
        self.scale, self.patch_size, self.seed = scale, patch_size, seed
        self.augment, self.quantize_lr, self.cache_images = augment, quantize_lr, cache_images
        self._cache: dict[Path, np.ndarray] = {}
        self._permutation: tuple[int, np.ndarray] = (-1, np.empty(0))

    def __len__(self) -> int:  # indices are unbounded; this is one epoch
        return len(self.entries)

    def plan(self, index: int) -> tuple[int, int, int, int]:
        """(image, top, left, augmentation) of sample ``index``: a pure function of (seed, index)."""
        n = len(self.entries)
        epoch, position = divmod(index, n)
        if self._permutation[0] != epoch:
            self._permutation = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        image = int(self._permutation[1][position])
        rng = np.random.default_rng([self.seed, epoch, position, 1])
        entry, lr_patch = self.entries[image], self.patch_size // self.scale
        # positions on the LR grid, so paired LR and HR crops stay aligned
        top = int(rng.integers(0, entry.height // self.scale - lr_patch + 1)) * self.scale
        left = int(rng.integers(0, entry.width // self.scale - lr_patch + 1)) * self.scale
        code = int(rng.integers(0, 8)) if self.augment else 0
        return image, top, left, code

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, top, left, code = self.plan(index)
        entry, p, s = self.entries[image], self.patch_size, self.scale
        image_hr = self._read(entry.hr)
        hr = image_hr[top:top + p, left:left + p]
        if entry.lr is None:
            lr = self._bicubic_lr(image_hr, top, left)
        else:
            lr = self._read(entry.lr)[top // s:(top + p) // s, left // s:(left + p) // s]
        return _to_tensor(augment(lr, code)), _to_tensor(augment(hr, code))

    def _bicubic_lr(self, image: np.ndarray, top: int, left: int) -> np.ndarray:
        """The LR patch under the HR crop at (top, left), equal to the same crop of the whole
        mod-cropped image's bicubic LR: the crop is downscaled with LR_MARGIN pixels of context
        on each side (where the image has them; at its border imresize mirrors, as for the whole
        image), which are then cut off. Rounded to 8-bit values if ``quantize_lr``."""
        s, p = self.scale, self.patch_size
        height, width = image.shape[0] - image.shape[0] % s, image.shape[1] - image.shape[1] % s
        y0, x0 = max(0, top - LR_MARGIN * s), max(0, left - LR_MARGIN * s)
        y1, x1 = min(height, top + p + LR_MARGIN * s), min(width, left + p + LR_MARGIN * s)
        lr = imresize(image[y0:y1, x0:x1], 1 / s)
        lr = lr[(top - y0) // s:(top - y0 + p) // s, (left - x0) // s:(left - x0 + p) // s]
        return np.round(np.clip(lr, 0, 1) * 255) / 255 if self.quantize_lr else lr

    def _read(self, path: Path) -> np.ndarray:
        if path in self._cache:
            return self._cache[path]
        rgb = load_image(path).rgb
        if self.cache_images:
            self._cache[path] = rgb
        return rgb


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))


class IterationSampler(Sampler):
    """Sample indices of iterations [start, stop) for one process of a (distributed) run.

    Iteration i uses global indices ``i·batch_size + k``, k < batch_size; process ``rank`` of
    ``world_size`` takes the k in [rank·b, (rank + 1)·b) with b = batch_size / world_size.
    """

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.start, self.stop, self.batch_size = start, stop, batch_size
        self.local = batch_size // world_size
        self.offset = rank * self.local

    def __len__(self) -> int:
        return (self.stop - self.start) * self.local

    def __iter__(self):
        for iteration in range(self.start, self.stop):
            base = iteration * self.batch_size + self.offset
            yield from range(base, base + self.local)
