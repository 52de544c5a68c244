"""Spatial-affinity loss, forward + backward: naive (materialising) vs fused, time and peak memory.

    python bench/bench_affinity.py                 # CUDA if available, else CPU
    python bench/bench_affinity.py --device cpu --sizes 32 64
    python bench/bench_affinity.py --ties --baseline-python ../main/.venv/bin/python   # CPU, near-tie inputs

Student (B, 26, H, W) with gradient, teacher (B, 28, H, W) without (the training setting);
B = 8 on the GPU, 2 on the CPU. The naive baseline is ``spatial_affinity_loss_reference``
(torch autograd on the (B, N, N) matrices); it is skipped where its N² buffers cannot fit.

Peak memory is the extra over the inputs:
- CPU: growth of the resident set at its peak during one fwd + bwd (``dsclora.timing.rss_growth``),
  each measurement in a fresh subprocess after a tiny warm-up, so it counts every byte touched
  (torch tensors, C++ scratch, allocator slack);
- GPU: torch.cuda.max_memory_allocated() during fwd + bwd minus the inputs.
Times are the best of a few repetitions, baseline and fused measured in the same run. On the GPU,
achieved TFLOP/s counts 2·B·N²·(Cs + Ct + Cs) (D = S − T and the student gradient) against the
peak of the ``tl.dot`` precision (H100/H200 SXM datasheet: fp32 FMA 67, TF32 495 TFLOP/s dense;
3xTF32 ≈ 495 / 3). The GPU table ends with a training step's six feature pairs, one call per pair
vs one launch (``spatial_affinity_loss_pairs``). ``cuda_rows`` and ``cuda_pairs_row`` return the
figures as dicts (bench/gpu_perf.py).

``--ties`` times the C++ op's fwd + bwd (CPU, sizes 32 64 128 by default) on inputs with many or
only ties |D| < tie bound, whose signs the float64 recomputation decides (CASES), next to unrelated
features; with ``--baseline-python`` (an interpreter with another build of dsclora, e.g. main's)
each case is also measured there, interleaved with ours, and the ratio printed.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

from dsclora import timing
from dsclora_kernels import spatial_affinity_loss, spatial_affinity_loss_pairs, spatial_affinity_loss_reference
from dsclora_kernels.affinity import DEFAULT_PRECISION, PRECISIONS

CS, CT = 26, 28
CPU_NAIVE_LIMIT = 4 << 30  # skip the CPU baseline above this much N² memory
PEAK_TFLOPS = {"ieee": 67.0, "tf32x3": 495.0 / 3, "tf32": 495.0}


CASES = {  # --ties: how the student relates to the teacher
    "unrelated": "independent random features (the training setting above)",
    "close": f"student within 1 % of the teacher (both {CS} channels): many near-ties",
    "identical": f"student = teacher ({CS} channels): every entry is an exact tie",
    "flat": "flat images: each pixel one random vector times a random intensity, S ≈ T ≈ 1: all entries tie",
}


def inputs(batch: int, side: int, device: str, seed: int = 0, case: str = "unrelated"):
    """Student (B, CS, side, side) that needs a gradient and teacher (B, CT or CS, side, side); see CASES."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def flat(channels):
        return randn(batch, channels, 1, 1) * (randn(batch, 1, side, side).abs() + 0.5)

    if case == "flat":
        student, teacher = flat(CS), flat(CT)
    elif case == "unrelated":
        student, teacher = randn(batch, CS, side, side), randn(batch, CT, side, side)
    else:
        teacher = randn(batch, CS, side, side)
        student = teacher.clone() if case == "identical" else teacher + 0.01 * randn(batch, CS, side, side)
    return student.to(device).requires_grad_(), teacher.to(device)


def step(method: str, student, teacher, precision: str = DEFAULT_PRECISION) -> None:
    student.grad = None
    if method == "naive":
        loss = spatial_affinity_loss_reference(student, teacher)
    else:
        loss = spatial_affinity_loss(student, teacher, precision=precision)
    loss.backward()


def naive_bytes(batch: int, side: int) -> int:
    """Rough N² memory of the naive fwd + bwd: about six float32 (B, N, N) buffers."""
    return 6 * 4 * batch * side**4


def megabytes(n: float) -> str:
    return f"{n / 2**20:.1f}"


# --- CPU: one measurement per fresh subprocess -----------------------------------------------


def cpu_worker(method: str, batch: int, side: int, reps: int, case: str = "unrelated") -> dict:
    step(method, *inputs(1, 4, "cpu"))  # load the extension, warm torch up
    student, teacher = inputs(batch, side, "cpu", case=case)

    def run():
        step(method, student, teacher)

    times = []
    extra_bytes = timing.rss_growth(lambda: times.append(timing.call_seconds(run)))  # the first call: time, memory
    times += timing.repeat(run, warmup=0, repeats=reps - 1) if reps > 1 else []
    return {"ms": 1e3 * min(times), "extra_bytes": extra_bytes}


def cpu_measure(method: str, batch: int, side: int, reps: int, case: str = "unrelated",
                python: str = sys.executable) -> dict:
    command = [python, __file__, "--worker", method, "--batch", str(batch), "--sizes", str(side),
               "--reps", str(reps), "--threads", str(torch.get_num_threads()), "--case", case]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_table(batch: int, sizes: list[int]) -> None:
    print(f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"B={batch}, Cs={CS}, Ct={CT}; extra memory = peak RSS growth (fresh subprocess)")
    print(f"{'H=W':>5} {'N':>7} {'inputs MiB':>10} | {'naive ms':>9} {'naive MiB':>10} | "
          f"{'ours ms':>9} {'ours MiB':>9} | {'speed-up':>8}")
    for side in sizes:
        reps = 3 if side <= 64 else 1
        input_bytes = 4 * batch * (CS + CT) * side * side
        naive = None if naive_bytes(batch, side) > CPU_NAIVE_LIMIT else cpu_measure("naive", batch, side, reps)
        ours = cpu_measure("ours", batch, side, reps)
        naive_cols = f"{naive['ms']:>9.1f} {megabytes(naive['extra_bytes']):>10}" if naive else f"{'skipped (N² > 4 GiB)':>20}"
        ratio = f"{naive['ms'] / ours['ms']:>7.1f}x" if naive else f"{'-':>8}"
        print(f"{side:>5} {side * side:>7} {megabytes(input_bytes):>10} | {naive_cols} | "
              f"{ours['ms']:>9.1f} {megabytes(ours['extra_bytes']):>9} | {ratio}", flush=True)


def ties_table(batch: int, sizes: list[int], baseline_python: str | None) -> None:
    """fwd + bwd of the C++ op per case of CASES: ms, and the cost relative to unrelated features.
    Up to 64 px, the best of 3 rounds of 3 calls, the rounds alternating between the baseline
    interpreter's build and ours (a load spike on a shared machine then spares one round)."""
    print(f"CPU ties, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; B={batch}, "
          f"Cs={CS}, Ct={CT} (unrelated, flat) or {CS}; fwd + bwd, best of 3 x 3 calls (1 from 128 px), "
          "fresh subprocesses")
    for case, text in CASES.items():
        print(f"  {case:>9}: {text}")
    if baseline_python:
        print(f"baseline: {baseline_python}")
    print(f"{'H=W':>5} {'case':>9} | {'base ms':>9} {'vs unrel.':>9} | {'ours ms':>9} {'vs unrel.':>9} | "
          f"{'speed-up':>8}")
    for side in sizes:
        rounds = reps = 3 if side <= 64 else 1
        unrelated = {}
        for case in CASES:
            base = ours = float("inf")
            for _ in range(rounds):
                if baseline_python:
                    base = min(base, cpu_measure("ours", batch, side, reps, case, baseline_python)["ms"])
                ours = min(ours, cpu_measure("ours", batch, side, reps, case)["ms"])
            base = base if baseline_python else None
            unrelated.setdefault("base", base)
            unrelated.setdefault("ours", ours)
            base_cols = f"{base:>9.1f} {base / unrelated['base']:>8.1f}x" if base else f"{'-':>9} {'-':>9}"
            ratio = f"{base / ours:>7.1f}x" if base else f"{'-':>8}"
            print(f"{side:>5} {case:>9} | {base_cols} | {ours:>9.1f} {ours / unrelated['ours']:>8.1f}x | {ratio}",
                  flush=True)


# --- GPU: CUDA events, allocator statistics ---------------------------------------------------


def gpu_measure(method: str, batch: int, side: int, precision: str = DEFAULT_PRECISION, reps: int = 5):
    try:
        student, teacher = inputs(batch, side, "cuda")
        step(method, student, teacher, precision)  # warm-up (compilation) before the memory baseline
        with timing.cuda_peak() as peak:
            times = timing.repeat(lambda: step(method, student, teacher, precision), "cuda", warmup=0, repeats=reps)
        return {"ms": 1e3 * min(times), "extra_bytes": peak.bytes}
    except torch.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()


def cuda_pairs_row(batch: int = 16, side: int = 64, pairs: int = 6, precision: str = DEFAULT_PRECISION) -> dict:
    """A training step's affinity term on CUDA, fwd + bwd: ``pairs`` feature pairs (B, 26|28, side,
    side) as one call per pair (per_pair_ms) and as one launch (one_launch_ms,
    spatial_affinity_loss_pairs), measured interleaved in this run."""
    features = [inputs(batch, side, "cuda", seed=seed) for seed in range(pairs)]
    students, teachers = [s for s, _ in features], [t for _, t in features]

    def per_pair():
        sum(spatial_affinity_loss(s, t, precision=precision) for s, t in features).backward()

    def one_launch():
        spatial_affinity_loss_pairs(students, teachers, precision=precision).backward()

    best = timing.minima(timing.interleaved({"per_pair_ms": per_pair, "one_launch_ms": one_launch}, "cuda",
                                            warmup=1, repeats=9))
    return {**{k: 1e3 * v for k, v in best.items()}, "batch": batch, "side": side, "pairs": pairs,
            "precision": precision}


def cuda_rows(batch: int = 8, sizes=(64, 128, 256), precisions=PRECISIONS, naive: bool = True) -> list[dict]:
    """fwd + bwd on CUDA per size and precision (bench/gpu_perf.py imports it): dicts with side,
    precision, ms, extra_bytes, TFLOP/s (achieved), naive_ms / naive_bytes (None: OOM or skipped)."""
    rows = []
    for side in sizes:
        base = gpu_measure("naive", batch, side) if naive else None
        for precision in precisions:
            ours = gpu_measure("ours", batch, side, precision)
            n = side * side
            tflops = 2 * batch * n * n * (CS + CT + CS) / (ours["ms"] * 1e-3) / 1e12
            rows.append(dict(side=side, precision=precision, ms=ours["ms"], extra_bytes=ours["extra_bytes"],
                             tflops=tflops, naive_ms=base and base["ms"], naive_bytes=base and base["extra_bytes"]))
    return rows


def gpu_table(batch: int, sizes: list[int]) -> None:
    print(f"GPU {torch.cuda.get_device_name()}; B={batch}, Cs={CS}, Ct={CT}; "
          "extra memory = max_memory_allocated - inputs")
    print(f"{'H=W':>5} {'N':>7} {'precision':>9} | {'naive ms':>9} {'naive MiB':>10} | {'ours ms':>8} "
          f"{'ours MiB':>9} | {'speed-up':>8} | {'TFLOP/s':>7} {'of peak':>7}")
    for row in cuda_rows(batch, sizes):
        side, naive_ms = row["side"], row["naive_ms"]
        naive_cols = (f"{naive_ms:>9.2f} {megabytes(row['naive_bytes']):>10}" if naive_ms else f"{'OOM':>20}")
        ratio = f"{naive_ms / row['ms']:>7.1f}x" if naive_ms else f"{'-':>8}"
        print(f"{side:>5} {side * side:>7} {row['precision']:>9} | {naive_cols} | {row['ms']:>8.2f} "
              f"{megabytes(row['extra_bytes']):>9} | {ratio} | {row['tflops']:>7.1f} "
              f"{row['tflops'] / PEAK_TFLOPS[row['precision']]:>6.0%}", flush=True)
    pairs = cuda_pairs_row()
    print(f"six pairs (B={pairs['batch']}, {pairs['side']}x{pairs['side']}, {pairs['precision']}), fwd + bwd: "
          f"one call per pair {pairs['per_pair_ms']:.2f} ms, one launch {pairs['one_launch_ms']:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", help="H = W (default 32 64 128 256; --ties: 32 64 128)")
    parser.add_argument("--batch", type=int, default=None, help="default 8 on the GPU, 2 on the CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--ties", action="store_true", help="CPU: near-tie inputs (CASES), not the naive baseline")
    parser.add_argument("--baseline-python", help="--ties: also measure the dsclora installed for this interpreter")
    parser.add_argument("--worker", choices=("naive", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=tuple(CASES), default="unrelated", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch = args.batch or (8 if args.device == "cuda" and not args.ties else 2)
    sizes = args.sizes or ([32, 64, 128] if args.ties else [32, 64, 128, 256])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(cpu_worker(args.worker, batch, sizes[0], args.reps, args.case)))
    elif args.ties:
        ties_table(batch, sizes, args.baseline_python)
    elif args.device == "cuda":
        gpu_table(batch, sizes)
    else:
        cpu_table(batch, sizes)


if __name__ == "__main__":
    main()
