"""Batch upscaling of image files: decode and encode in background threads, errors per file."""
import glob
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from tqdm import tqdm

from dsclora.data.io import image_to_tensor, list_images, load_image, save_image, tensor_to_image

from .upscaler import Upscaler


def expand_inputs(inputs: list[str]) -> tuple[list[Path], dict[str, str]]:
    """Image files named by ``inputs`` (files, folders, glob patterns), in order, without
    duplicates; and {input: reason} for inputs that name nothing usable."""
    files, missing = [], {}
    for item in inputs:
        path = Path(item)
        matches = [path] if path.exists() else [Path(p) for p in sorted(glob.glob(item))]
        if not matches:
            missing[item] = "no such file or folder, and no file matches it as a pattern"
        for match in matches:
            if match.is_dir():
                try:
                    files.extend(list_images(match))
                except FileNotFoundError as exc:
                    missing[item] = str(exc)
            else:
                files.append(match)
    return list(dict.fromkeys(files)), missing


def output_paths(files: list[Path], out_dir, suffix: str = "", ext: str | None = None):
    """[(source, target)] with target = out_dir / (stem + suffix + ext); ValueError when two
    sources would share a target or a target would overwrite its source."""
    out_dir, pairs, seen = Path(out_dir), [], {}
    for src in files:
        dst = out_dir / f"{src.stem}{suffix}.{(ext or src.suffix).lstrip('.')}"
        if dst.resolve() == src.resolve():
            raise ValueError(f"{src}: the output would overwrite the input; use --suffix or another -o")
        if dst in seen:
            raise ValueError(f"{seen[dst]} and {src} would both be written to {dst}; use --suffix")
        seen[dst] = src
        pairs.append((src, dst))
    return pairs


def upscale_image(upscaler: Upscaler, image, out_scale: float | None = None):
    """(rgb (sH, sW, 3), alpha (sH, sW) | None) float32 in [0, 1] for a LoadedImage.

    Alpha runs through the network too (as gray, see Upscaler). With ``out_scale`` other than
    the model's scale the result is resized to round(out_scale * size), bicubic, antialiased.
    """
    planes = image.rgb if image.alpha is None else np.dstack([image.rgb, image.alpha])
    y = upscaler.upscale_tensor(image_to_tensor(planes)).clamp_(0, 1)
    if out_scale and out_scale != upscaler.scale:
        h, w = image.rgb.shape[:2]
        size = (max(1, round(h * out_scale)), max(1, round(w * out_scale)))
        y = F.interpolate(y, size=size, mode="bicubic", antialias=True).clamp_(0, 1)
    y = tensor_to_image(y)
    return y[..., :3], (None if image.alpha is None else y[..., 3])


def upscale_files(upscaler: Upscaler, pairs, out_scale: float | None = None,
                  prefetch: int = 2, progress: bool = True) -> dict[str, str]:
    """Upscale each (source, target) pair; returns {source: error} for those that failed.

    Sources are decoded ``prefetch`` ahead and targets encoded (atomically) in background
    threads while the device computes; a failure is reported and the batch goes on.
    16-bit sources stay 16-bit in PNG targets (other formats get 8 bits).
    """
    failures: dict[str, str] = {}
    queue = deque(pairs)

    def finish(write) -> None:
        src, future = write
        try:
            future.result()
        except Exception as exc:  # one bad file must not stop the batch
            failures[str(src)] = _describe(src, exc)

    with ThreadPoolExecutor(2, thread_name_prefix="dsclora-read") as readers, \
            ThreadPoolExecutor(2, thread_name_prefix="dsclora-write") as writers:
        reads, writes = deque(), deque()

        def read_next():
            if queue:
                src, dst = queue.popleft()
                reads.append((src, dst, readers.submit(load_image, src)))

        for _ in range(prefetch):
            read_next()
        bar = tqdm(total=len(pairs), unit="img", desc="dsclora infer", disable=not progress)
        while reads:
            src, dst, future = reads.popleft()
            read_next()
            try:
                image = future.result()
                rgb, alpha = upscale_image(upscaler, image, out_scale)
                bits = image.bit_depth if dst.suffix.lower() == ".png" else 8
                writes.append((src, writers.submit(save_image, dst, rgb, alpha, bits, image.gray)))
            except Exception as exc:
                failures[str(src)] = _describe(src, exc)
                bar.write(f"dsclora infer: FAILED {src}: {failures[str(src)]}", file=sys.stderr)
            while len(writes) > 2 * prefetch:  # bound the upscaled images held in memory
                finish(writes.popleft())
            bar.update()
        bar.close()
        while writes:
            finish(writes.popleft())
    return failures


def _describe(src: Path, exc: Exception) -> str:
    """The error message, without the path when it already starts with it."""
    message = str(exc) or type(exc).__name__
    return message.removeprefix(f"{src}: ")
