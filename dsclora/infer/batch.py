"""Batch upscaling helpers: the files named by inputs, their targets, one image at a time
(the pipeline over many files is ``dsclora.infer.pipeline.upscale_files``)."""
import glob
from pathlib import Path

from dsclora.data.io import list_images, tensor_to_image

from .pipeline import image_planes, upscale_batch
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
    y = tensor_to_image(upscale_batch(upscaler, image_planes(image), out_scale))
    return y[..., :3], (None if image.alpha is None else y[..., 3])
