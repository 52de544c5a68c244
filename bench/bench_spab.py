"""Benchmark the fused SPAB op against eager PyTorch and torch.compile of the same block.

All candidates of a table are timed interleaved (round-robin) in one run; the table shows
medians and ratios measured in this run. Saved-activation memory is the size of the tensors
autograd keeps for the backward (``saved_tensors_hooks``, unique storages).

CPU (default): 1x26x256x256 fp32 on ``--threads`` (2) threads: forward (eager NCHW and
channels-last, torch.compile, fused C++), forward+backward (eager, fused).
GPU (``--device cuda``): 1x26x512x512 fp16: forward against eager fp16 channels-last (cuDNN)
and torch.compile, forward+backward with saved and peak memory, and the fused forward's
achieved bandwidth (x read, out and h1 written) against a measured device copy.

    python bench/bench_spab.py                 # CPU table
    python bench/bench_spab.py --device cuda   # GPU table
"""
import argparse

import torch

from dsclora import timing
from dsclora_kernels import spab, spab_reference


def block_inputs(shape, dtype, device, memory_format, requires_grad=False):
    c = shape[1]
    x = (torch.randn(shape, device=device) * 3).to(dtype).contiguous(memory_format=memory_format)
    weights = []
    for _ in range(3):
        weights += [(torch.randn(c, c, 3, 3, device=device) * 0.1).to(dtype),
                    (torch.randn(c, device=device) * 0.1).to(dtype)]
    return [t.requires_grad_(requires_grad) for t in (x, *weights)]


def interleaved(candidates: dict, device: str, repeats: int) -> dict[str, float]:
    """Median seconds per candidate, timed round-robin after one warm-up call each."""
    return timing.medians(timing.interleaved(candidates, device, warmup=1, repeats=repeats))


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward while fn() runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def print_table(title, medians, baseline, flop=None, extra=None):
    """One row per candidate: median, speed-up over ``baseline``, GFLOP/s, extra text."""
    print(f"\n{title}")
    print(f"  {'candidate':34s} {'median ms':>10s} {'vs ' + baseline:>14s}" + ("  GFLOP/s" if flop else ""))
    for name, t in medians.items():
        line = f"  {name:34s} {t * 1e3:10.2f} {medians[baseline] / t:13.2f}x"
        if flop:
            line += f"  {flop / t / 1e9:7.1f}"
        if extra and name in extra:
            line += f"  {extra[name]}"
        print(line)


def forward_table(nchw, channels_last, native, device, repeats):
    """Medians of the forward; torch.compile and the fused op run on ``native`` (the layout
    the device's kernels prefer: NCHW on the CPU, channels-last on the GPU)."""
    compiled = torch.compile(spab_reference)
    candidates = {
        "eager": lambda: spab_reference(*nchw),
        "eager channels_last": lambda: spab_reference(*channels_last),
        "torch.compile (inductor)": lambda: compiled(*native),
        "fused spab": lambda: spab(*native),
    }
    with torch.no_grad():
        return interleaved(candidates, device, repeats)


def training_table(x, weights, device, repeats):
    """(medians, saved bytes, peak bytes) of forward + backward of <out, g> + <h1, g>."""
    g = torch.randn_like(x)

    def step(fn):
        def run():
            out, h1 = fn(x, *weights)
            torch.autograd.backward((out, h1), (g, g))
        return run

    candidates = {"eager fwd+bwd": step(spab_reference), "fused spab fwd+bwd": step(spab)}
    medians = interleaved(candidates, device, repeats)
    saved, peak = {}, {}
    for name, fn in (("eager fwd+bwd", spab_reference), ("fused spab fwd+bwd", spab)):
        saved[name] = saved_bytes(lambda: fn(x, *weights))
        if device == "cuda":
            with timing.cuda_peak() as used:
                step(fn)()
            peak[name] = used.bytes
    return medians, saved, peak


def copy_bandwidth(device) -> float:
    """Bytes per second of a 512 MiB device-to-device copy (read + write)."""
    src = torch.empty(256 * 2**20 // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src)}, device, 10)["copy"]
    return 2 * src.numel() * src.element_size() / t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and the C++ kernel)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7 CPU, 50 GPU)")
    parser.add_argument("--channels", type=int, default=26)
    args = parser.parse_args()
    device = args.device
    repeats = args.repeats or (7 if device == "cpu" else 50)
    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(args.threads)
        shape, dtype = (1, args.channels, 256, 256), torch.float32
    else:
        shape, dtype = (1, args.channels, 512, 512), torch.float16
    flop = 3 * 2 * shape[1] ** 2 * 9 * shape[0] * shape[2] * shape[3]
    where = f"{args.threads} threads" if device == "cpu" else torch.cuda.get_device_name()
    print(f"SPAB {'x'.join(map(str, shape))} {str(dtype)[6:]} on {device} ({where}), medians of {repeats}")

    nchw = block_inputs(shape, dtype, device, torch.contiguous_format)
    channels_last = [nchw[0].contiguous(memory_format=torch.channels_last), *nchw[1:]]
    native = nchw if device == "cpu" else channels_last
    medians = forward_table(nchw, channels_last, native, device, repeats)
    fused = medians.pop("fused spab")
    best = min(medians, key=medians.get)
    medians["fused spab"] = fused
    print_table("forward", medians, "eager", flop)
    print(f"  fused vs the fastest baseline ({best}): {medians[best] / fused:.2f}x")
    if device == "cuda":
        moved = 3 * nchw[0].numel() * nchw[0].element_size()
        print(f"  fused forward moves {moved / 2**20:.1f} MiB: {moved / fused / 1e9:.0f} GB/s, "
              f"device copy {copy_bandwidth(device) / 1e9:.0f} GB/s")

    train = [t.detach().requires_grad_() for t in native]
    medians, saved, peak = training_table(train[0], train[1:], device, repeats)
    extra = {name: f"saved {saved[name] / 2**20:6.1f} MiB" + (f", peak {peak[name] / 2**20:6.1f} MiB" if peak else "")
             for name in medians}
    print_table("forward + backward (all inputs require grad)", medians, "eager fwd+bwd", extra=extra)


if __name__ == "__main__":
    main()
