"""Reading and writing images as float arrays in [0, 1], and numpy <-> torch layout helpers."""
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..atomic import write_bytes
from .png import encode_png

#: 8-bit PNGs at zlib levels from this one are written by Pillow, whose per-row filter choice
#: makes files a few % smaller; below it (the fast levels) and at 16 bits, by ``png.encode_png``.
PILLOW_PNG_FROM_LEVEL = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# 16-bit PNG colour types Pillow would truncate to 8 bits: raw modes that decode the low bytes
# with the same filter stride (6 or 8 bytes a pixel, so the PNG unfiltering stays right).
_RGB16_LOW_BYTES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
# 16-bit grey + alpha: read the 4 bytes of a pixel (G hi, G lo, A hi, A lo) as 8-bit RGBA.
_GRAY_ALPHA16_RAW = "LA;16B"
_GRAY16_MODES = ("I;16", "I;16B", "I;16L", "I")


class ImageReadError(ValueError):
    """A file cannot be read as an image (missing, empty, truncated, or not an image)."""


@dataclass
class LoadedImage:
    """An image as float32 arrays in [0, 1].

    ``rgb`` (H, W, 3) (grey sources repeated on 3 channels), ``alpha`` (H, W) or None,
    ``bit_depth`` 8 or 16 of the source samples, ``gray`` True for a single-channel source.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    gray: bool
    path: Path


def _tile_with_rawmode(tile, rawmode: str):
    codec, extents, offset, args = tile
    return (codec, extents, offset, rawmode if isinstance(args, str) else (rawmode, *args[1:]))


def _tile_rawmode(im: Image.Image) -> str | None:
    if im.format != "PNG" or len(im.tile) != 1:
        return None
    args = im.tile[0][3]
    return args if isinstance(args, str) else args[0]


def _decode_png16(path: Path, rawmode: str) -> np.ndarray:
    """(H, W, C) uint16 samples of a 16-bit RGB, RGBA or grey+alpha PNG (C = 3, 4, 2)."""

    def decode(raw: str) -> np.ndarray:
        with Image.open(path) as im:
            im.tile = [_tile_with_rawmode(im.tile[0], raw)]
            return np.asarray(im).astype(np.uint16)

    if rawmode == _GRAY_ALPHA16_RAW:
        bytes4 = decode("RGBA")
        return np.stack([bytes4[..., 0] * 256 + bytes4[..., 1], bytes4[..., 2] * 256 + bytes4[..., 3]], -1)
    return decode(rawmode) * 256 + decode(_RGB16_LOW_BYTES[rawmode])


def _to_float(samples: np.ndarray, bit_depth: int) -> np.ndarray:
    return samples.astype(np.float32) / np.float32(2**bit_depth - 1)


def _split(samples: np.ndarray, bit_depth: int, path: Path) -> LoadedImage:
    """LoadedImage from (H, W), (H, W, 2), (H, W, 3) or (H, W, 4) integer samples."""
    x = _to_float(samples, bit_depth)
    if x.ndim == 2:
        x = x[..., None]
    channels = x.shape[2]
    gray = channels in (1, 2)
    alpha = x[..., -1] if channels in (2, 4) else None
    colour = x[..., :1] if gray else x[..., :3]
    rgb = np.ascontiguousarray(np.repeat(colour, 3, axis=2) if gray else colour)
    return LoadedImage(rgb, None if alpha is None else np.ascontiguousarray(alpha), bit_depth, gray, path)


def load_image(path) -> LoadedImage:
    """Read a PNG/JPEG/BMP/TIFF/WebP file (8- or 16-bit, grey, alpha, palette, CMYK...).

    JPEG EXIF orientation is applied. Raises ImageReadError naming the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file")
    try:
        with Image.open(path) as im:
            rawmode = _tile_rawmode(im)
            if rawmode == _GRAY_ALPHA16_RAW or rawmode in _RGB16_LOW_BYTES:
                return _split(_decode_png16(path, rawmode), 16, path)
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in _GRAY16_MODES:
                samples, bits = np.clip(np.asarray(im).astype(np.int64), 0, 65535), 16
            elif mode in ("L", "LA", "RGB", "RGBA"):
                samples, bits = np.asarray(im), 8
            elif mode == "F":  # float samples have no defined range: guessing one would corrupt them
                raise ImageReadError(f"{path}: 32-bit float samples (mode F) are not supported; "
                                     "save the image as an 8- or 16-bit PNG or TIFF")
            elif mode == "1":
                samples, bits = np.asarray(im.convert("L")), 8
            elif mode in ("P", "PA"):
                has_alpha = mode == "PA" or "transparency" in im.info
                samples, bits = np.asarray(im.convert("RGBA" if has_alpha else "RGB")), 8
            else:  # CMYK, YCbCr, LAB, HSV, ...
                samples, bits = np.asarray(im.convert("RGB")), 8
    except ImageReadError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot be read as an image ({exc})") from exc
    return _split(samples, bits, path)


def _quantize(x: np.ndarray, bit_depth: int) -> np.ndarray:
    top = 2**bit_depth - 1
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    return np.round(np.clip(np.asarray(x, dtype=np.float64), 0, 1) * top).astype(dtype)


def save_image(path, rgb: np.ndarray, alpha: np.ndarray | None = None, bit_depth: int = 8, gray: bool = False,
               png_level: int = 6, quality: int | None = None) -> None:
    """Write ``rgb`` (H, W, 3) or (H, W) float in [0, 1] atomically; format from the suffix.

    Samples are round(clip(x) * 255) (65535 for ``bit_depth=16``, PNG only). ``gray`` writes
    one channel (the mean of the three; (H, W) input is always grey); ``alpha`` (H, W) adds an alpha channel.
    ``png_level`` (0-9) and ``quality`` (JPEG/WebP, 1-100) as in ``save_samples``.
    """
    path = Path(path)
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    if rgb.ndim != 3 or rgb.shape[2] not in (1, 3):
        raise ValueError(f"{path}: expected an (H, W, 3) or (H, W) image, got shape {rgb.shape}")
    planes = [rgb.mean(axis=2, keepdims=True) if gray else rgb]
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.shape != rgb.shape[:2]:
            raise ValueError(f"{path}: alpha shape {alpha.shape} does not match image {rgb.shape[:2]}")
        planes.append(alpha[..., None])
    _check_bit_depth(path, bit_depth)
    save_samples(path, _quantize(np.concatenate(planes, axis=2), bit_depth), png_level, quality)


def _image_format(path: Path) -> str:
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image format for suffix {path.suffix!r}")
    return fmt


def _check_bit_depth(path: Path, bit_depth: int) -> None:
    if bit_depth not in (8, 16):
        raise ValueError(f"{path}: bit_depth must be 8 or 16, got {bit_depth}")
    if bit_depth == 16 and _image_format(path) != "PNG":
        raise ValueError(f"{path}: 16-bit samples can only be written as PNG")


def save_samples(path, samples: np.ndarray, png_level: int = 6, quality: int | None = None) -> None:
    """Write (H, W, C) uint8 or uint16 samples atomically; C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA.

    Format from the suffix; uint16 only as PNG. ``png_level`` is the zlib level (0-9) of PNGs
    (see PILLOW_PNG_FROM_LEVEL for who writes them), ``quality`` (1-100, None: Pillow's default)
    that of JPEG and WebP.
    """
    path = Path(path)
    fmt = _image_format(path)
    _check_bit_depth(path, 16 if samples.dtype == np.uint16 else 8)
    if samples.ndim != 3 or samples.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"{path}: expected (H, W, C) samples with C in 1..4, got shape {samples.shape}")
    if samples.shape[2] in (2, 4) and fmt in ("JPEG", "BMP"):
        raise ValueError(f"{path}: {fmt} cannot store an alpha channel")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "PNG" and (samples.dtype == np.uint16 or png_level < PILLOW_PNG_FROM_LEVEL):
        data = encode_png(samples, png_level)
    else:
        options = {"PNG": {"compress_level": png_level}}.get(fmt, {})
        if quality is not None and fmt in ("JPEG", "WEBP"):
            options["quality"] = quality
        buffer = io.BytesIO()  # encoded in memory: written through our one temporary only
        Image.fromarray(samples[..., 0] if samples.shape[2] == 1 else samples).save(buffer, format=fmt, **options)
        data = buffer.getvalue()
    write_bytes(path, data, suffix=path.suffix)


def list_images(folder) -> list[Path]:
    """Image files (by suffix) directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """numpy (H, W, C) or (H, W) -> torch float32 (1, C, H, W)."""
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3:
        raise ValueError(f"image_to_tensor: expected (H, W, C) or (H, W), got shape {img.shape}")
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """torch (1, C, H, W) or (C, H, W) -> numpy float32 (H, W, C)."""
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"tensor_to_image: expected (1, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float32).permute(1, 2, 0).contiguous().numpy()
