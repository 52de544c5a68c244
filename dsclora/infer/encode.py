"""Network output -> integer samples, by row bands (no full-size float copies), and encoding options."""
from dataclasses import dataclass

import numpy as np
import torch

#: zlib level of PNG outputs, from the size/speed table in bench/RESULTS.md (bench_pipeline.py):
#: level 1 writes upscaled 1080p photos ~7x faster than level 6 (Pillow's default), files ~20% larger.
DEFAULT_PNG_LEVEL = 1
#: rows converted at a time: float64 scratch of BAND_PIXELS * C * 8 bytes whatever the size.
BAND_PIXELS = 1 << 20


@dataclass(frozen=True)
class EncodeOptions:
    """``png_level`` 0-9 (zlib), ``quality`` 1-100 for JPEG/WebP (None: Pillow's default)."""

    png_level: int = DEFAULT_PNG_LEVEL
    quality: int | None = None

    def __post_init__(self):
        if not 0 <= self.png_level <= 9:
            raise ValueError(f"png_level must be in 0..9, got {self.png_level}")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")


def quantize(y: torch.Tensor, bit_depth: int = 8, gray: bool = False) -> np.ndarray:
    """(C, H, W) float in [0, 1] (C = 3 RGB or 4 RGBA) -> (H, W, C') uint8/uint16 samples.

    round(clip(y) * (2^bits - 1)) in float64, as ``save_image`` does; ``gray`` keeps one colour
    channel (the mean of the three, then the alpha when C = 4). Works band by band of rows so
    the float scratch stays ~BAND_PIXELS pixels; only the integer result is full size.
    """
    c, h, w = y.shape
    channels = (1 if gray else 3) + (c - 3)
    out = np.empty((h, w, channels), np.uint8 if bit_depth == 8 else np.uint16)
    top = float(2**bit_depth - 1)
    rows = max(1, BAND_PIXELS // max(w, 1))
    for r0 in range(0, h, rows):
        band = y[:, r0:r0 + rows].to(torch.float32)
        if gray:
            band = torch.cat([band[:3].mean(0, keepdim=True), band[3:]])
        samples = band.permute(1, 2, 0).to(torch.float64).clamp_(0, 1).mul_(top).round_()
        out[r0:r0 + rows] = samples.to(torch.int32).cpu().numpy()
    return out
