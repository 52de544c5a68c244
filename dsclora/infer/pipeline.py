"""Bounded image pipeline: decode ahead (threads) -> network (same-size images batched) ->
encode (a pool of threads), with per-file errors; ``upscale_files`` runs it over file pairs.

Encoding runs in threads: zlib and NumPy (our PNG writer), Pillow's encoders and torch release
the GIL, and bench/bench_pipeline.py measures the scaling (bench/RESULTS.md). Memory stays
bounded: at most ``ahead`` decoded sources, one network batch, and ``encoders`` integer outputs
are alive.
"""
from __future__ import annotations

import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dsclora.data.io import LoadedImage, load_image, save_samples

from .encode import EncodeOptions, quantize
from .stages import StageClock

if TYPE_CHECKING:  # annotations only: Upscaler.upscale_video imports this module
    from .upscaler import Upscaler

#: images per network call on CUDA (same size, no alpha); the CPU gains nothing from batching.
CUDA_BATCH = 8


def default_batch(device: torch.device) -> int:
    return CUDA_BATCH if device.type == "cuda" else 1


def default_encoders() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def resize_output(y: torch.Tensor, size: tuple[int, int], scale: int, out_scale: float | None):
    """y (B, C, s*h, s*w) resized to round(out_scale * (h, w)) (bicubic, antialiased, clamped),
    or y itself when ``out_scale`` is None or the model's ``scale``."""
    if not out_scale or out_scale == scale:
        return y
    target = tuple(max(1, round(n * out_scale)) for n in size)
    return F.interpolate(y, size=target, mode="bicubic", antialias=True).clamp_(0, 1)


def upscale_batch(upscaler: Upscaler, x: torch.Tensor, out_scale: float | None = None):
    """(B, C, H, W) float in [0, 1] on any device -> (B, C, sH, sW) clamped, on the upscaler's device."""
    y = upscaler.upscale_tensor(x.to(upscaler.device), any_layout=True).clamp_(0, 1)
    return resize_output(y, x.shape[-2:], upscaler.scale, out_scale)


def image_planes(image: LoadedImage) -> torch.Tensor:
    """(1, C, H, W) float32 of a decoded image: RGB, plus its alpha when it has one."""
    planes = image.rgb if image.alpha is None else np.dstack([image.rgb, image.alpha])
    return torch.from_numpy(np.ascontiguousarray(planes.transpose(2, 0, 1)))[None]


def _batch_key(image: LoadedImage):
    """Images with equal keys are upscaled together; alpha images alone (their constant-alpha
    shortcut looks at the whole batch)."""
    return None if image.alpha is not None else image.rgb.shape


class _Pipeline:
    """One run of ``upscale_files``: the queues, pools, clock and failures."""

    def __init__(self, upscaler, pairs, out_scale, options, batch, encoders, progress):
        self.upscaler, self.out_scale, self.options = upscaler, out_scale, options
        self.batch, self.encoders = batch, encoders
        self.todo, self.reads, self.writes = deque(pairs), deque(), deque()
        self.ahead = max(2, 2 * batch)
        self.clock = StageClock({"decode": 2, "network": 1, "encode": encoders})
        self.failures: dict[str, str] = {}
        self.bar = tqdm(total=len(pairs), unit="img", desc="dsclora infer", disable=not progress)

    def run(self, readers: ThreadPoolExecutor, writers: ThreadPoolExecutor) -> dict[str, str]:
        self.readers, self.writers = readers, writers
        self._read_ahead()
        while self.reads:
            group = self._next_group()
            self._read_ahead()
            if group:
                self._compute(group)
        while self.writes:
            self._finish_write()
        self.bar.close()
        return self.failures

    def _timed(self, stage: str, fn, *args):
        with self.clock.timing(stage):
            return fn(*args)

    def _read_ahead(self) -> None:
        while self.todo and len(self.reads) < self.ahead:
            src, dst = self.todo.popleft()
            self.reads.append((src, dst, self.readers.submit(self._timed, "decode", load_image, src)))

    def _next_group(self) -> list[tuple[Path, Path, LoadedImage]]:
        """Up to ``batch`` consecutive decoded sources of one batch key; failures reported."""
        group = []
        while self.reads and len(group) < self.batch:
            src, dst, future = self.reads[0]
            if group and (future.exception() is not None or _batch_key(future.result()) != key):
                break
            self.reads.popleft()
            try:
                image = future.result()
            except Exception as exc:  # one bad file must not stop the batch
                self._fail(src, exc)
                continue
            key = _batch_key(image)
            group.append((src, dst, image))
            if key is None:
                break
        return group

    def _compute(self, group) -> None:
        try:
            with self.clock.timing("network"):
                x = torch.cat([image_planes(image) for _, _, image in group])
                y = upscale_batch(self.upscaler, x, self.out_scale)
                outputs = [self._samples(y[i], dst, image) for i, (_, dst, image) in enumerate(group)]
                del x, y
        except Exception as exc:
            for src, _, _ in group:
                self._fail(src, exc)
            return
        for (src, dst, _), samples in zip(group, outputs):
            while len(self.writes) >= self.encoders:  # backpressure: bounded finished outputs
                self._finish_write()
            write = self.writers.submit(self._timed, "encode", save_samples, dst, samples,
                                        self.options.png_level, self.options.quality)
            self.writes.append((src, write))

    @staticmethod
    def _samples(y: torch.Tensor, dst: Path, image: LoadedImage) -> np.ndarray:
        bits = image.bit_depth if dst.suffix.lower() == ".png" else 8
        return quantize(y, bits, image.gray)

    def _finish_write(self) -> None:
        src, write = self.writes.popleft()
        try:
            write.result()
        except Exception as exc:
            self._fail(src, exc)
            return
        self._advance()

    def _fail(self, src: Path, exc: Exception) -> None:
        self.failures[str(src)] = describe(src, exc)
        self.bar.write(f"dsclora infer: FAILED {src}: {self.failures[str(src)]}", file=sys.stderr)
        self._advance()

    def _advance(self) -> None:
        self.bar.set_postfix_str(f"bound: {self.clock.bound()}", refresh=False)
        self.bar.update()


def upscale_files(upscaler: Upscaler, pairs, out_scale: float | None = None,
                  options: EncodeOptions = EncodeOptions(), batch: int | None = None,
                  encoders: int | None = None, progress: bool = True) -> dict[str, str]:
    """Upscale each (source, target) pair; returns {source: error} for those that failed.

    ``batch`` same-size images per network call (default: CUDA_BATCH on CUDA, 1 on CPU),
    ``encoders`` encoding threads (default: the CPU count, at most 8). Targets are written
    atomically; 16-bit sources stay 16-bit in PNG targets (other formats get 8 bits).
    """
    batch = batch or default_batch(upscaler.device)
    encoders = encoders or default_encoders()
    run = _Pipeline(upscaler, pairs, out_scale, options, batch, encoders, progress)
    with ThreadPoolExecutor(2, thread_name_prefix="dsclora-decode") as readers, \
            ThreadPoolExecutor(encoders, thread_name_prefix="dsclora-encode") as writers:
        return run.run(readers, writers)


def describe(src: Path, exc: Exception) -> str:
    """The error message, without the path when it already starts with it."""
    message = str(exc) or type(exc).__name__
    return message.removeprefix(f"{src}: ")
