"""Exact tiled upscaling: tile size from a memory model (``auto_tile``), smaller tiles on GPU OOM."""
import logging
import math
from typing import Callable

import torch

logger = logging.getLogger("dsclora")

#: SPAN's receptive radius in LR pixels (21 chained 3x3 convs): a tile padded by at least
#: this much context gives exactly the untiled output.
RECEPTIVE_RADIUS = 21
MIN_TILE = 32
#: working memory the network may take on the CPU when the tile is chosen automatically; with
#: the full-size output, 1080p -> 8K stays under 1.5 GB (bench/bench_pipeline.py).
CPU_BUDGET = 512 << 20
#: share of the GPU's free memory an automatic tile may take.
GPU_SHARE = 0.6


def network_bytes(pixels: int, features: int, scale: int, itemsize: int) -> int:
    """Peak working memory of FusedSpan on ``pixels`` input pixels (batch included).

    The model: during the blocks six feature maps are alive (F0, F1, a block's input, output
    and both G outputs); at the upsampler, the concat features, the conv output and its
    pixel-shuffled copy (3 s^2 channels each); plus the input. An upper bound: the measured
    peak growth is 70-80% of it (bench/bench_pipeline.py, memory model rows; bench/RESULTS.md).
    """
    channels = max(6 * features, features + 6 * scale * scale) + 3
    return pixels * channels * itemsize


def memory_budget(device) -> int:
    """Bytes an automatic tile may use on ``device``: GPU_SHARE of the free GPU memory, CPU_BUDGET on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_SHARE)
    return CPU_BUDGET


def auto_tile(shape, features: int, scale: int, itemsize: int, budget: int, pad: int) -> int | None:
    """The tile for an input ``shape`` (B, C, H, W) under ``budget`` bytes, None when the whole
    image fits. The largest square tile whose padded size fits, at least MIN_TILE."""
    b, _, h, w = shape
    if network_bytes(b * h * w, features, scale, itemsize) <= budget:
        return None
    side = math.isqrt(budget // network_bytes(b, features, scale, itemsize))
    return max(MIN_TILE, side - 2 * pad)


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
