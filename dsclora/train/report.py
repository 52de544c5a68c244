"""Evaluation tables: several models on several validation sets (PSNR/SSIM and time)."""
import time
from pathlib import Path

import torch

from dsclora.data import imresize
from dsclora.evaluation import ImagePair, evaluate_pairs, load_pairs


def bicubic_upscaler(scale: int):
    """The MATLAB-bicubic upscaling baseline as a model: (B, 3, h, w) -> (B, 3, sh, sw)."""
    return lambda lr: imresize(lr, scale)


def validation_sets(folders: list[str], scale: int) -> dict[str, list[ImagePair]]:
    """{name: benchmark pairs} for HR folders (LR by bicubic), named after the folders."""
    sets = {}
    for folder in folders:
        name = Path(folder).name or str(folder)
        while name in sets:
            name += "'"
        sets[name] = load_pairs(folder, None, scale)
    return sets


def evaluate_models(models: dict, sets: dict[str, list[ImagePair]], scale: int, border: int,
                    channel: str, device) -> dict[str, dict[str, dict]]:
    """``{model: {set: {"psnr", "ssim", "seconds"}}}``; ``seconds`` is the wall time of the set."""
    results = {}
    for name, model in models.items():
        results[name] = {}
        for set_name, pairs in sets.items():
            start = time.perf_counter()
            r = evaluate_pairs(model, pairs, scale, border, channel, device)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            results[name][set_name] = {"psnr": r["psnr"], "ssim": r["ssim"],
                                       "seconds": time.perf_counter() - start}
    return results


def markdown_table(results: dict[str, dict[str, dict]], title: str = "") -> str:
    """A Markdown table: one row per model, one PSNR / SSIM column per set."""
    sets = list(next(iter(results.values())))
    lines = [f"{title}\n" if title else ""]
    lines.append("| model | " + " | ".join(f"{s} PSNR / SSIM" for s in sets) + " |")
    lines.append("|---|" + "---|" * len(sets))
    for model, per_set in results.items():
        cells = [f"{per_set[s]['psnr']:.4f} / {per_set[s]['ssim']:.6f}" for s in sets]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"
