"""How much of SPAN inference may run in bfloat16 (issue 21, item 4): quality only, no timing.

Each variant upscales the Set14 LR images (bicubic x4 of the mod-cropped HR, as ``dsclora
eval`` makes them) and is compared with the float32 output of the same network: PSNR over
the [0, 1]-clamped RGB output (mean and worst image) and the share of 8-bit output values
identical to float32's. The bf16 kernels of a CPU with AMX / AVX512-BF16 round the operands of
their products to bf16 and accumulate in fp32; the variants differ in what else is bf16:

- ``bf16 products``: every convolution's and GEMM's input and weight rounded to bf16 (round to
  nearest even), products accumulated in fp32; biases, SiLU, attention and residuals in fp32,
  and the tensors between the layers stay fp32.
- ``..., conv_1 fp32``: the same except the first convolution (on the 8-bit image, whose levels
  bf16's 8 significant bits do not hold; 0.5 % of the FLOPs), computed in fp32.
- ``... + bf16 between layers``: and every tensor written between two fused kernels (each
  block's out and h1, conv_1's, the tail's and the upsampler's output) rounded to bf16, as a
  kernel storing bf16 would.
- ``PyTorch bf16``: ``FusedSpan`` in bfloat16 without a bf16 fused kernel, what
  ``dsclora.infer.load(..., dtype=torch.bfloat16)`` runs on the CPU: weights, activations and
  pointwise math in bf16 (conv_1 in fp32, as ``FusedSpan`` does in bf16 everywhere).
- ``fp16 products, fp16 between layers``: for comparison, the GPU's default precision with fp32
  accumulation and epilogues (as the Triton SPAB computes it) and fp16 storage.

    DSCLORA_SHARED=../shared python bench/bf16_quality.py [--weights W] [--images DIR]
"""
import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dsclora.data.io import image_to_tensor
from dsclora.evaluation import load_pairs
from dsclora.infer import FusedSpan, merge_span
from dsclora_kernels import spab_reference

from bench_infer import DEFAULT_WEIGHTS, SHARED, build_model


class LowPrecisionProducts(TorchFunctionMode):
    """Rounds the operands of every conv2d (but those with a weight in ``fp32_weights``) and
    addmm to ``dtype`` (fp32 accumulation); with ``outputs``, also conv2d's outputs outside the
    SPABs (the tensors stored between kernels)."""

    def __init__(self, dtype: torch.dtype, outputs: bool, fp32_weights=()):
        super().__init__()
        self.dtype, self.outputs, self.fp32_weights, self.in_block = dtype, outputs, fp32_weights, False

    def round(self, t: torch.Tensor) -> torch.Tensor:
        """t rounded to the nearest ``dtype`` value (ties to even), kept in t's dtype."""
        return t.to(self.dtype).to(t.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            x, weight, *rest = args
            if not any(weight is w for w in self.fp32_weights):
                x, weight = self.round(x), self.round(weight)
            y = func(x, weight, *rest, **kwargs)
            return self.round(y) if self.outputs and not self.in_block else y
        if func in (torch.Tensor.addmm_, torch.addmm):
            rows, a, b = args
            return func(rows, self.round(a), self.round(b), **kwargs)
        return func(*args, **kwargs)

    def spab(self, x, *weights):
        """spab_reference, its outputs rounded when they are stored in ``dtype``."""
        self.in_block = True
        try:
            out, h1 = spab_reference(x, *weights)
        finally:
            self.in_block = False
        return (self.round(out), self.round(h1)) if self.outputs else (out, h1)


def emulated(merged, outputs: bool, conv_1_fp32: bool, dtype=torch.bfloat16):
    """fn(x float32) -> float32 output of FusedSpan with ``dtype`` products (see the module doc)."""
    mode = LowPrecisionProducts(dtype, outputs)
    network = FusedSpan(merged, "cpu", torch.float32, spab=mode.spab)
    if conv_1_fp32:
        mode.fp32_weights = (network.conv_1[0],)

    def run(x):
        with mode:
            return network(x)
    return run


def variants(merged) -> dict:
    """name -> fn(x float32 (1, 3, h, w)) -> float32 (1, 3, sh, sw)."""
    bf16 = FusedSpan(merged, "cpu", torch.bfloat16)  # the C++ kernel is fp32: PyTorch's path
    control = FusedSpan(merged, "cpu", torch.float32, spab=spab_reference)
    return {
        "fp32, PyTorch's convolutions (control)": control,
        "bf16 products": emulated(merged, outputs=False, conv_1_fp32=False),
        "bf16 products, conv_1 fp32": emulated(merged, outputs=False, conv_1_fp32=True),
        "bf16 products, conv_1 fp32, bf16 between layers": emulated(merged, outputs=True, conv_1_fp32=True),
        "PyTorch bf16": lambda x: bf16(x).float(),
        "fp16 products, fp16 between layers": emulated(merged, outputs=True, conv_1_fp32=False, dtype=torch.float16),
    }


def compare(y: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(PSNR dB of y against truth, both clamped to [0, 1]; share of identical 8-bit values)."""
    y, truth = y.clamp(0, 1).double(), truth.clamp(0, 1).double()
    mse = (y - truth).pow(2).mean().item()
    psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
    same = ((y * 255).round() == (truth * 255).round()).double().mean().item()
    return psnr, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="checkpoint (default: the shared DSCF x4)")
    parser.add_argument("--images", default=str(SHARED / "data" / "Set14"), help="HR image folder")
    args = parser.parse_args()
    model = build_model(args.weights)
    merged = merge_span(model)
    fp32 = FusedSpan(merged, "cpu", torch.float32)
    pairs = load_pairs(Path(args.images), scale=model.upscale)
    fns = variants(merged)
    scores = {name: [] for name in fns}
    for pair in pairs:
        x = image_to_tensor((pair.lr / 255).astype(np.float32))
        truth = fp32(x)
        for name, fn in fns.items():
            scores[name].append(compare(fn(x), truth))
    print(f"{Path(args.images).name}: {len(pairs)} images, SPAN x{model.upscale} C={model.feature_channels}, "
          f"against the float32 output of the same network")
    print("| variant | mean PSNR dB | worst image dB | 8-bit values identical |")
    print("|---|---|---|---|")
    for name, rows in scores.items():
        psnr = [p for p, _ in rows]
        same = sum(s for _, s in rows) / len(rows)
        print(f"| {name} | {np.mean(psnr):.1f} | {min(psnr):.1f} | {100 * same:.0f} % |")


if __name__ == "__main__":
    main()
