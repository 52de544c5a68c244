"""SSIM (Y channel, float64) of a 2040x1356 image pair: numpy reference vs the C++ kernel.

Usage: python bench/bench_metrics.py [--repeats N]
Prints the median time of each (interleaved in one run), the ratio and peak memory (RSS).
"""
import argparse
import resource
import time

import numpy as np
import torch

from dsclora import metrics
from dsclora_kernels import use_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (1356, 2040, 3)).astype(np.uint8)
    sr = np.clip(hr + rng.normal(0, 8, hr.shape), 0, 255).round().astype(np.uint8)
    times = {"reference": [], "cpp": []}
    values = {}
    for _ in range(args.repeats):
        for backend in times:
            with use_backend(backend):
                start = time.perf_counter()
                values[backend] = metrics.ssim(sr, hr, border=4)
                times[backend].append(time.perf_counter() - start)
    base, ours = (float(np.median(times[b])) for b in ("reference", "cpp"))
    print(f"SSIM 2040x1356 Y, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  numpy reference: {base * 1e3:8.1f} ms")
    print(f"  C++ kernel:      {ours * 1e3:8.1f} ms")
    print(f"  ratio:           {base / ours:8.1f}x  (|difference| {abs(values['cpp'] - values['reference']):.1e})")
    print(f"  peak RSS:        {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f} MiB")


if __name__ == "__main__":
    main()
