"""Runtime and peak memory per image in the NTIRE convention (SPEC §8): eager SPAN vs the
fused inference path (``dsclora.infer``), fp32 and fp16 on CUDA, fp32 on the CPU.

Each forward is timed after warm-up by ``dsclora.timing`` (CUDA events on the GPU,
``perf_counter`` on the CPU); an image's runtime is the median over repeats, a row's the mean
over images. Peak memory is ``torch.cuda.max_memory_allocated`` (weights included), CUDA only.
"""
import copy
import dataclasses
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dsclora import timing

DIV2K_LR_X4 = (339, 510)  # a typical DIV2K validation LR size at x4 (NTIRE runtime set)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class BenchResult:
    """One row: ``path`` ("eager" or "fused") on ``device`` in ``dtype``.

    ``ms``: mean over images of the median runtime per image; ``peak_mib``: CUDA peak memory;
    ``max_abs_diff``: fused output vs eager on the first image; ``note``: why a number is missing.
    """

    path: str
    device: str
    dtype: str
    ms: float | None
    peak_mib: float | None = None
    max_abs_diff: float | None = None
    note: str = ""


def default_configs() -> list[tuple[str, str]]:
    """(device, dtype) pairs to measure: CUDA fp32 and fp16 when available, CPU fp32."""
    gpu = [("cuda", "fp32"), ("cuda", "fp16")] if torch.cuda.is_available() else []
    return gpu + [("cpu", "fp32")]


def synthetic_inputs(size: tuple[int, int] = DIV2K_LR_X4, count: int = 1, channels: int = 3) -> list[torch.Tensor]:
    """``count`` smooth random images (1, channels, H, W) in [0, 1] (fixed seed).

    Bilinearly enlarged coarse noise, not pixel noise: on pixel noise SPAN's activations grow
    so large that even float32 is only ~1e-3 accurate, which would swamp the accuracy column.
    """
    generator = torch.Generator().manual_seed(0)
    coarse = [torch.rand(1, channels, max(size[0] // 8, 1), max(size[1] // 8, 1), generator=generator)
              for _ in range(count)]
    return [F.interpolate(c, size=size, mode="bilinear", align_corners=False) for c in coarse]


def folder_inputs(folder) -> list[torch.Tensor]:
    """The images of ``folder`` as (1, 3, H, W) float32 tensors in [0, 1]."""
    from dsclora.data import image_to_tensor, list_images, load_image

    return [image_to_tensor(load_image(path).rgb) for path in list_images(folder)]


def benchmark(model, inputs: list[torch.Tensor], configs: list[tuple[str, str]] | None = None,
              warmup: int = 3, repeats: int = 10) -> list[BenchResult]:
    """Eager and fused rows for each (device, dtype) of ``configs`` (default ``default_configs()``).

    ``model``: a SPAN (not modified). The fused path is ``dsclora.infer.load(model, device,
    dtype)``; if it cannot be built its row says why instead of giving a number.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    results = []
    for device, dtype_name in configs or default_configs():
        dtype = DTYPES[dtype_name]
        eager = _eager(model, device, dtype)
        reference = eager(inputs[0].to(device, dtype)).float().cpu()  # kept off the GPU
        results.append(_measure("eager", eager, inputs, device, dtype_name, warmup, repeats))
        del eager  # each row's peak memory holds only its own model
        try:
            from dsclora.infer import load

            fused = load(model, device, dtype)
        except (ImportError, RuntimeError) as exc:  # reported in the table, not hidden
            results.append(BenchResult("fused", device, dtype_name, None, note=f"unavailable: {exc}"))
            continue
        row = _measure("fused", fused, inputs, device, dtype_name, warmup, repeats)
        diff = (fused(inputs[0].to(device, dtype)).float().cpu() - reference).abs().max().item()
        results.append(dataclasses.replace(row, max_abs_diff=diff))
        del fused
    return results


def _eager(model, device: str, dtype: torch.dtype) -> Callable:
    eager = copy.deepcopy(model).eval().to(device, dtype)

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        return eager(x)

    return forward


def _measure(path: str, fn: Callable, inputs, device: str, dtype_name: str, warmup: int, repeats: int) -> BenchResult:
    dtype = DTYPES[dtype_name]

    def median_ms(x: torch.Tensor) -> float:
        return 1e3 * statistics.median(timing.repeat(lambda: fn(x), device, warmup, repeats))

    if not device.startswith("cuda"):
        return BenchResult(path, device, dtype_name, statistics.fmean(median_ms(x.to(device, dtype)) for x in inputs))
    with timing.cuda_peak(device, relative=False) as peak:
        ms = statistics.fmean([median_ms(x.to(device, dtype)) for x in inputs])
    return BenchResult(path, device, dtype_name, ms, peak.bytes / 2**20)


def format_table(results: list[BenchResult]) -> str:
    """An NTIRE-style text table; fused rows show their speed-up over the matching eager row."""
    eager_ms = {(r.device, r.dtype): r.ms for r in results if r.path == "eager"}
    lines = [f"{'path':<6} {'device':<6} {'dtype':<5} {'ms/image':>9} {'speed-up':>8} "
             f"{'peak MiB':>9} {'max|Δ| vs eager':>15}"]
    for r in results:
        if r.ms is None:
            lines.append(f"{r.path:<6} {r.device:<6} {r.dtype:<5} {'-':>9}  {r.note}")
            continue
        base = eager_ms.get((r.device, r.dtype))
        speedup = f"{base / r.ms:.2f}x" if r.path == "fused" and base else "-"
        peak = f"{r.peak_mib:.1f}" if r.peak_mib is not None else "-"
        diff = f"{r.max_abs_diff:.1e}" if r.max_abs_diff is not None else "-"
        lines.append(f"{r.path:<6} {r.device:<6} {r.dtype:<5} {r.ms:>9.2f} {speedup:>8} {peak:>9} {diff:>15}")
    return "\n".join(lines)
