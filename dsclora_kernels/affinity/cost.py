"""Cost model of the fused affinity loss on an H100 / H200: FLOPs, bytes and predicted time of one
forward + student-gradient call. Predictions, not measurements (``bench/bench_affinity.py``
measures on a GPU); ``python -m dsclora_kernels.affinity.cost`` prints ``table()``.

Rates (docs/KERNELS notes, ``/work/shared/KERNELS.md``, and NVIDIA's H100 SXM datasheet; the H200
has the same SMs and clocks, more memory bandwidth): TF32 tensor cores 495 TFLOP/s dense, derated
to 400 like the measured bf16 matmul (800 of 989); fp32 CUDA cores 67 TFLOP/s (33.5 T lane
instructions/s); fp64 CUDA cores 34 TFLOP/s; copy 3.0 (H100) / 4.3 (H200) TB/s.
Work per entry (i, j) of D = S − T: the Gram products 2·(Cs + Ct) and G += sign(D) x̂_j 2·Cs
FLOPs, x3 and x2 for tf32x3, channels padded like the kernel; ``ELEMENTWISE`` CUDA-core lane
instructions (|D|, row sum, tie test, sign, the sign operand's conversion); tiles holding an
entry with |D| < tie bound are recomputed in float64 (Cs + Ct FMAs per entry; tf32x3: 16-row
chunks of tiles), their fraction
estimated for unrelated features (D ≈ Gaussian with variance 1/Cs + 1/Ct) plus the diagonal
tiles (D_ii ≈ 0 always). The parts are added (no overlap): an upper estimate of an ideal kernel.
``IEEE_MEASURED`` holds the H200 measurements of the "ieee" kernel (issue 19) for calibration.
"""
import math
from typing import NamedTuple

from .. import gpu_arch
from ..triton_support import padded_channels
from . import PRECISIONS, triton as affinity_triton
from .prepare import tie_bound_for

TF32_FLOPS, FP32_FLOPS, FP64_FLOPS = 400e12, 67e12, 34e12
LANE_INSTRUCTIONS = FP32_FLOPS / 2
ELEMENTWISE = 14  # CUDA-core lane instructions per entry (assumed from the kernel's code, not measured)
COPY_BYTES_PER_S = {"H100": 3.0e12, "H200": 4.3e12}
#: Torch-side work around the kernel (normalisation, sums, gradient epilogue): ~20 launches.
OVERHEAD_S = 20 * 5e-6
#: fwd + bwd ms measured on an H200 with precision "ieee" (issue 19, commit 8e61d7d), B = 8, 26/28.
IEEE_MEASURED = {64: 4.36, 128: 38.1, 256: 553.0}
#: The issue's targets, fwd + bwd ms on an H100 / H200, B = 8, 26/28 channels.
TARGETS = {64: 0.6, 128: 5.0, 256: 80.0}


class Cost(NamedTuple):
    tensor_flops: float
    cuda_core_flops: float  # fp32 products when precision is "ieee"
    refine_fma: float  # float64 FMAs of the tie refinement
    refined_tiles: float  # fraction of tiles (tf32x3: 16-row chunks) recomputed
    dram_bytes: float
    l2_bytes: float

    def seconds(self, gpu: str = "H200") -> float:
        return (self.tensor_flops / TF32_FLOPS + self.cuda_core_flops / FP32_FLOPS
                + 2 * self.refine_fma / FP64_FLOPS + self.dram_bytes / COPY_BYTES_PER_S[gpu] + OVERHEAD_S)


def refined_fraction(cs: int, ct: int, n: int, rows: int, cols: int, tie_bound: float) -> float:
    """Fraction of the (rows x cols) pieces the kernel refines at once (tiles, or 16-row chunks of
    them for tf32x3) with an entry |D| < tie_bound, for unrelated features."""
    if tie_bound == 0:
        return 0.0
    sigma = math.sqrt(1 / cs + 1 / ct)
    p_entry = 2 * tie_bound / (sigma * math.sqrt(2 * math.pi))
    off_diagonal = 1 - (1 - p_entry) ** (rows * cols)
    diagonal = min(1.0, max(rows, cols) / n)  # pieces crossing the diagonal: D_ii = 1 − 1
    return diagonal + (1 - diagonal) * off_diagonal


def cost(batch: int, n: int, cs: int, ct: int, precision: str, arch: gpu_arch.Arch = gpu_arch.arch(90)) -> Cost:
    """The cost of ``spatial_affinity_loss`` fwd + student gradient on float32 (B, Cs|Ct, N) features."""
    csp, ctp = padded_channels(cs), padded_channels(ct)
    entries = batch * n * n
    gram_products, gradient_products = (3, 2) if precision == "tf32x3" else (1, 1)
    flops = entries * 2 * ((csp + ctp) * gram_products + csp * gradient_products)
    tie_bound = tie_bound_for(cs, ct, precision)
    meta = dict(CS_PAD=csp, CT_PAD=ctp, PRECISION=precision)
    block = affinity_triton.launch_block(arch, meta, 4)
    refine_rows = min(affinity_triton.REFINE_ROWS, block[0]) if precision == "tf32x3" else block[0]
    refined = refined_fraction(cs, ct, n, refine_rows, block[1], tie_bound)
    dram = 4 * batch * n * (cs + ct) * 10  # ~10 passes: prepare, kernel, gradient epilogue
    l2 = 4 * batch * n * (cs + ct) * math.ceil(n / block[0])  # every program sweeps all columns
    return Cost(flops if precision != "ieee" else 0.0, entries * ELEMENTWISE * 2 + (flops if precision == "ieee" else 0),
                refined * entries * (cs + ct), refined, dram, l2)


def table(batch: int = 8, cs: int = 26, ct: int = 28, sides=(64, 128, 256)) -> str:
    """Predicted fwd + bwd times per precision and size next to the issue's targets."""
    lines = [f"affinity loss fwd + student gradient, B={batch}, {cs}/{ct} channels: cost model (UNMEASURED "
             "predictions; see dsclora_kernels/affinity/cost.py)",
             f"{'H=W':>5} {'precision':>9} {'TC GFLOP':>9} {'CUDA-core GFLOP':>15} {'refined tiles':>13} "
             f"{'DRAM MB':>8} {'L2 MB':>8} {'H100 ms':>8} {'H200 ms':>8} {'target ms':>9}"]
    for side in sides:
        for precision in PRECISIONS:
            c = cost(batch, side * side, cs, ct, precision)
            lines.append(f"{side:>5} {precision:>9} {c.tensor_flops / 1e9:>9.0f} {c.cuda_core_flops / 1e9:>15.0f} "
                         f"{c.refined_tiles:>13.1%} {c.dram_bytes / 1e6:>8.1f} {c.l2_bytes / 1e6:>8.0f} "
                         f"{1e3 * c.seconds('H100'):>8.2f} {1e3 * c.seconds('H200'):>8.2f} {TARGETS[side]:>9}")
    calibration = [IEEE_MEASURED[s] / (1e3 * cost(batch, s * s, cs, ct, "ieee").seconds("H200")) for s in sides]
    lines.append("calibration: measured H200 'ieee' / this model's 'ieee' = "
                 + ", ".join(f"{s}²: {r:.1f}x" for s, r in zip(sides, calibration))
                 + " slower than modelled (tensor-core modes unmeasured: expect a similar factor until tuned on a GPU)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
