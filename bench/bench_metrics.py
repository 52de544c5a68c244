"""SSIM (Y channel, float64) of a 2040x1356 image pair: numpy reference vs the C++ kernel.

Usage: python bench/bench_metrics.py [--repeats N]
Prints the median time of each (interleaved in one run), the ratio and peak memory (RSS).
"""
import argparse

import numpy as np
import torch

from dsclora import metrics, timing
from dsclora_kernels import use_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (1356, 2040, 3)).astype(np.uint8)
    sr = np.clip(hr + rng.normal(0, 8, hr.shape), 0, 255).round().astype(np.uint8)
    values = {}

    def ssim(backend):
        def run():
            with use_backend(backend):
                values[backend] = metrics.ssim(sr, hr, border=4)
        return run

    times = timing.interleaved({b: ssim(b) for b in ("reference", "cpp")}, warmup=0, repeats=args.repeats)
    base, ours = (timing.medians(times)[b] for b in ("reference", "cpp"))
    print(f"SSIM 2040x1356 Y, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  numpy reference: {base * 1e3:8.1f} ms")
    print(f"  C++ kernel:      {ours * 1e3:8.1f} ms")
    print(f"  ratio:           {base / ours:8.1f}x  (|difference| {abs(values['cpp'] - values['reference']):.1e})")
    print(f"  peak RSS:        {timing.peak_rss_bytes() / 2**20:8.0f} MiB")


if __name__ == "__main__":
    main()
