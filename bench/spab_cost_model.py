"""A cost model of the fused SPAB forward on the GPU, next to the H200 measurements of issue 20.

For each launch (the GPU launch table's configuration for the shape, dtype and architecture):
- work: the tensor-core FLOPs the kernel issues (padded channels, recomputed halos, whole frame
  rows; tf32x3 = 3 products) and the DRAM bytes (x read, out and h1 written; the scratch frames
  stay in L1/L2), and the same for eager PyTorch (3 convolutions at C channels; about 13 passes
  over a (B, C, H, W) tensor, KERNELS.md);
- roofline: max(bytes / bandwidth, FLOPs / tensor-core rate) on the H200 (4.3 TB/s; 800 TFLOP/s
  16-bit, half of it for TF32: the rates measured on the lent machines, KERNELS.md);
- occupancy: warps in flight per SM (programs per SM x warps per program, of 64);
- serial steps: the 3x3 taps one program works through one after the other (waves of tiles x
  panels per tile x 9): each is a dependent global/L1 load, a tl.dot and a barrier, so with few
  warps per SM their latency adds up. ``us/step`` is the measured time divided by them.

    python bench/spab_cost_model.py
"""
import math

import torch

from dsclora_kernels import gpu_arch
from dsclora_kernels.spab import triton as spab_triton
from dsclora_kernels.triton_support import padded_channels

H200_SMS, H200_BYTES_PER_S, H200_TC_FLOPS = 132, 4.3e12, 800e12
EAGER_PASSES = 13
#: issue 20, H200, torch 2.11 / Triton 3.6, commit 8e61d7d: (shape, dtype) -> (fused ms, eager ms)
MEASURED = {
    ((1, 26, 512, 512), torch.float32): (1.071, 0.548),
    ((1, 26, 512, 512), torch.float16): (0.533, 0.371),
    ((1, 26, 512, 512), torch.bfloat16): (0.567, 0.384),
    ((8, 48, 128, 128), torch.float32): (1.907, 0.428),
    ((8, 48, 128, 128), torch.float16): (0.861, 0.407),
    ((8, 48, 128, 128), torch.bfloat16): (1.021, 0.336),
}


def launch_cost(shape, dtype, arch_name="sm_90", sms=H200_SMS) -> dict:
    """Work, roofline and serial steps of the fused forward and eager for one shape and dtype."""
    b, c, h, w = shape
    arch = next(a for a in gpu_arch.ARCHS if a.name == arch_name)
    cp = padded_channels(c)
    config = spab_triton.launch_config(arch, dtype, cp, recompute=False)
    frame_h, frame_w, rows = spab_triton.frame(h, w, config)
    tiles = b * math.ceil(h / (frame_h - 4)) * math.ceil(w / (frame_w - 4))
    programs = min(tiles, config.programs_per_sm * sms)
    panels = sum(math.ceil((frame_h - 2 * k) / rows) for k in range(3))  # conv k on rows k .. frame_h-1-k
    products = 3 if dtype == torch.float32 else 1  # tf32x3
    rate = H200_TC_FLOPS / (2 if dtype == torch.float32 else 1)
    fused_flop = tiles * panels * 9 * rows * frame_w * 2 * cp * cp * products
    tensor_bytes = b * c * h * w * dtype.itemsize
    eager_flop = 3 * 2 * 9 * c * c * b * h * w
    return {
        "config": config, "tiles": tiles, "waves": math.ceil(tiles / programs),
        "fused GFLOP": fused_flop / 1e9, "eager GFLOP": eager_flop / 1e9,
        "fused MB": 3 * tensor_bytes / 1e6, "eager MB": EAGER_PASSES * tensor_bytes / 1e6,
        "fused roofline ms": 1e3 * max(3 * tensor_bytes / H200_BYTES_PER_S, fused_flop / rate),
        "eager roofline ms": 1e3 * max(EAGER_PASSES * tensor_bytes / H200_BYTES_PER_S, eager_flop / rate),
        "warps/SM": config.programs_per_sm * config.num_warps,
        "serial steps": math.ceil(tiles / programs) * panels * 9,
    }


def main() -> None:
    print("SPAB forward on an H200 (sm_90, 132 SMs): cost model vs issue 20's measurements (ms)")
    header = ("shape", "dtype", "fused GFLOP", "eager GFLOP", "fused MB", "eager MB", "roofline fused",
              "roofline eager", "warps/SM", "serial steps", "measured fused", "measured eager", "us/step")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for (shape, dtype), (fused, eager) in MEASURED.items():
        m = launch_cost(shape, dtype)
        print(f"| {'x'.join(map(str, shape))} | {str(dtype)[6:]} | {m['fused GFLOP']:.1f} | {m['eager GFLOP']:.1f} | "
              f"{m['fused MB']:.0f} | {m['eager MB']:.0f} | {m['fused roofline ms']:.3f} | "
              f"{m['eager roofline ms']:.3f} | {m['warps/SM']} | {m['serial steps']} | {fused:.3f} | {eager:.3f} | "
              f"{1e3 * fused / m['serial steps']:.2f} |")


if __name__ == "__main__":
    main()
