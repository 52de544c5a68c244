"""The one rule pairing HR images with LR files, shared by training and evaluation.

An HR image ``STEM.ext`` pairs with the LR image of the LR folder whose stem is ``STEM``,
``STEMx{scale}`` or ``STEM_x{scale}`` (any image suffix): ``0001.png`` pairs with ``0001.png``,
``0001x4.png`` or ``0001_x4.png``. More than one such LR file is an error, as is none.
"""
from pathlib import Path

from .io import list_images


class PairingError(FileNotFoundError):
    """An HR image has no LR file, or more than one."""


def lr_stems(hr_stem: str, scale: int) -> tuple[str, ...]:
    """The LR stems that pair with the HR stem ``hr_stem``."""
    return hr_stem, f"{hr_stem}x{scale}", f"{hr_stem}_x{scale}"


def pair_lr_files(hr_files: list[Path], lr_folder, scale: int) -> list[Path]:
    """The LR file of each of ``hr_files`` in ``lr_folder``; a PairingError names the HR files
    without one (up to five) or with several."""
    by_stem: dict[str, list[Path]] = {}
    for path in list_images(lr_folder):
        by_stem.setdefault(path.stem, []).append(path)
    partners = [[p for stem in lr_stems(hr.stem, scale) for p in by_stem.get(stem, [])] for hr in hr_files]
    missing = [hr.name for hr, found in zip(hr_files, partners) if not found]
    if missing:
        looked = ", ".join(lr_stems("STEM", scale))
        raise PairingError(f"{lr_folder}: no LR image for HR image(s) {', '.join(missing[:5])} "
                           f"(looked for {looked} with an image suffix)")
    for hr, found in zip(hr_files, partners):
        if len(found) > 1:
            raise PairingError(f"{lr_folder}: HR image {hr.name} pairs with several LR images "
                               f"({', '.join(p.name for p in found)}); keep one")
    return [found[0] for found in partners]
