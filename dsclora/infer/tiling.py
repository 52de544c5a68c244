"""Exact tiled upscaling with automatic smaller tiles on GPU out-of-memory."""
import logging
from typing import Callable

import torch

logger = logging.getLogger("dsclora")

#: SPAN's receptive radius in LR pixels (21 chained 3x3 convs): a tile padded by at least
#: this much context gives exactly the untiled output.
RECEPTIVE_RADIUS = 21
MIN_TILE = 32


def upscale_tiled(fn: Callable, x: torch.Tensor, scale: int, tile: int, pad: int) -> torch.Tensor:
    """``fn`` (B, C, h, w) -> (B, C', sh, sw) applied to x (B, C, H, W) in tiles.

    Each tile x tile core is run with ``pad`` pixels of context on every side (clipped at the
    image border) and only its core is kept. The output is allocated on x's device in x's dtype.
    """
    _, _, h, w = x.shape
    if tile >= h and tile >= w:
        return fn(x)
    s, out = scale, None
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            top, left = max(y0 - pad, 0), max(x0 - pad, 0)
            y = fn(x[:, :, top:min(y1 + pad, h), left:min(x1 + pad, w)])
            if out is None:
                out = x.new_empty(x.shape[0], y.shape[1], h * s, w * s)
            out[:, :, y0 * s:y1 * s, x0 * s:x1 * s] = y[
                :, :, (y0 - top) * s:(y1 - top) * s, (x0 - left) * s:(x1 - left) * s
            ]
    return out


def upscale_adaptive(fn: Callable, x: torch.Tensor, scale: int, tile: int | None, pad: int):
    """``upscale_tiled`` with ``tile`` (None: the whole image), halving the tile on GPU OOM."""
    tile = tile or max(x.shape[-2:])
    while True:
        try:
            return upscale_tiled(fn, x, scale, tile, pad)
        except torch.cuda.OutOfMemoryError:
            if tile <= MIN_TILE:
                raise
            tile = max(tile // 2, MIN_TILE)
            torch.cuda.empty_cache()
            logger.warning("dsclora infer: out of GPU memory, retrying with %dx%d tiles", tile, tile)
