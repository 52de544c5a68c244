"""CPU inference against what a user would pick instead: ONNX Runtime, OpenVINO, eager PyTorch.

One run, one machine: every candidate runs the same SPAN on a real image crop (a 256x256 crop
of an Urban100 image used as the LR input, x4), fp32 unless labelled, calls interleaved
round-robin, median per candidate, ratios against the best fp32 peer of this run (OpenVINO's
default too where it picks f32, as on CPUs without bf16 instructions). Error is
max |y - float64 eager PyTorch| over the output (and the mean). OpenVINO is optional: skipped
with a note when not installed. A roofline line follows the table: the network's FLOPs (as
direct convolutions, and as the fused kernels multiply: Winograd F(2, 3) along the rows in the
SPABs), two limits of the same threads measured in the same run (a large sgemm, and the FMA peak
of ``fma_peak.cpp``), and the rate 2x the best fp32 peer would take.

    python bench/bench_peers.py                         # DSCF x4, 2 threads, 7 rounds
    DSCLORA_CPU_ISA=avx2 python bench/bench_peers.py    # another ISA path of the fused kernels
"""
import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from dsclora import timing
from dsclora_kernels import _native
from dsclora.data.io import image_to_tensor, load_image
from dsclora.export import export_onnx
from dsclora.infer import FusedSpan, merge_span
from dsclora.models import load_model

from bench_infer import DEFAULT_WEIGHTS, SHARED, build_model, in_inference_mode, time_interleaved

DEFAULT_IMAGE = SHARED / "data" / "Urban100_10" / "img_001.png"
PEERS = ("onnxruntime fp32", "openvino fp32")


def crop(path: Path, size: int) -> torch.Tensor:
    """(1, 3, size, size) float32 in [0, 1]: the centre crop of the image at ``path``."""
    rgb = load_image(path).rgb
    h, w = rgb.shape[:2]
    if min(h, w) < size:
        raise SystemExit(f"{path}: {w}x{h} is smaller than the {size}x{size} crop")
    top, left = (h - size) // 2, (w - size) // 2
    return image_to_tensor(rgb[top:top + size, left:left + size, :3])


def candidates(model, threads: int) -> dict:
    """name -> fn(x float32 (1, 3, H, W)) -> float32 output."""
    merged = merge_span(model)
    eager = load_model(model.state_dict()).eval()
    fused = FusedSpan(merged, "cpu", torch.float32)
    found = {
        "dsclora fused fp32": fused,
        "eager PyTorch fp32": in_inference_mode(eager),
    }
    onnx_path = Path(tempfile.mkdtemp()) / "span.onnx"
    export_onnx(load_model(model.state_dict()), onnx_path)
    found["onnxruntime fp32"] = _onnx_runtime(onnx_path, threads)
    if importlib.util.find_spec("openvino") is not None:
        found["openvino fp32"] = _openvino(onnx_path, threads, {"INFERENCE_PRECISION_HINT": "f32"})
        found["openvino default"] = _openvino(onnx_path, threads, {})
    else:
        print("openvino not installed: its rows are skipped (pip install openvino)")
    return found


def _onnx_runtime(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _openvino(path: Path, threads: int, config: dict):
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, **config})
    request = compiled.create_infer_request()
    return lambda x: torch.from_numpy(request.infer([x.numpy()])[0].copy())


def openvino_precision(path_hint: str = "CPU") -> str:
    """The inference precision OpenVINO picks by default on this CPU (e.g. f32, bf16)."""
    if importlib.util.find_spec("openvino") is None:
        return "-"
    import openvino as ov

    precision = ov.Core().get_property(path_hint, "INFERENCE_PRECISION_HINT")
    return precision.get_type_name() if hasattr(precision, "get_type_name") else str(precision)


def network_gflop(merged, h: int, w: int) -> tuple[float, float]:
    """(direct, fused) GFLOP of one forward at LR h x w: 2 per multiply-add of every conv/GEMM;
    "fused" counts the SPABs' 3x3 convolutions at 6 instead of 9 multiply-adds per output and
    input channel (Winograd F(2, 3) along the rows, csrc/cpu/spab_kernel.h)."""
    def conv(weight):  # (Cout, Cin, k, k) or (Cin, Cout) for the conv_cat GEMMs
        return 2 * weight.numel() * h * w
    spab = sum(conv(t) for block in merged.blocks for t in block[0::2])
    rest = sum(conv(t) for t in (merged.conv_1[0], merged.tail[0], merged.cat_rest, merged.upsampler[0]))
    return (spab + rest) / 1e9, (spab * 6 / 9 + rest) / 1e9


def sgemm_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of torch.mm on n x n float32 at ``threads`` threads: best of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = min(timing.interleaved({"mm": lambda: torch.mm(a, b)}, "cpu", 1, repeats)["mm"])
    return 2 * n**3 / seconds / 1e9


def fma_peak_gflops(threads: int) -> float | None:
    """GFLOP/s of ``fma_peak.cpp`` (independent FMA chains on every thread), built here with
    the system's c++; None, with a note, without one."""
    compiler = shutil.which("c++")
    if compiler is None:
        print("no c++ compiler: the FMA peak is not measured")
        return None
    binary = Path(tempfile.mkdtemp()) / "fma_peak"
    source = Path(__file__).with_name("fma_peak.cpp")
    subprocess.run([compiler, "-O3", "-march=native", "-pthread", str(source), "-o", str(binary)], check=True)
    return float(subprocess.run([str(binary), str(threads)], check=True, capture_output=True, text=True).stdout)


def roofline_line(merged, x: torch.Tensor, best_ms: float, fused_ms: float, threads: int) -> str:
    """The network's FLOPs, the two limits of these cores, and what 2x the best peer needs."""
    direct, fused = network_gflop(merged, *x.shape[-2:])
    measured = {"sgemm": sgemm_gflops(threads), "FMA peak": fma_peak_gflops(threads)}
    limits = {name: rate for name, rate in measured.items() if rate}

    def rate(ms: float) -> str:  # the fused kernels' GFLOP in ms, and its share of each limit
        gflops = fused / ms * 1e3
        return f"{gflops:.0f} GFLOP/s (" + ", ".join(f"{100 * gflops / v:.0f} % of {k}" for k, v in limits.items()) + ")"

    return (f"roofline: {direct:.2f} GFLOP as direct convolutions, {fused:.2f} as the fused kernels multiply; "
            f"{threads} threads: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in limits.items())
            + f"; the fused network runs {rate(fused_ms)}; 2x the best fp32 peer ({best_ms / 2:.1f} ms) "
            f"needs {rate(best_ms / 2)}")


def cpu_line() -> str:
    """CPU model, the SIMD flags that matter here, and the load average."""
    model, flags = platform.processor(), set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    load = os.getloadavg()
    return (f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(f for f in wanted if f in flags)}; "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="checkpoint (default: the shared DSCF x4)")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="image to crop the LR input from")
    parser.add_argument("--size", type=int, default=256, help="LR crop side (default 256)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.weights and not DEFAULT_WEIGHTS.is_file():
        raise SystemExit(f"{DEFAULT_WEIGHTS}: not found (set DSCLORA_SHARED or pass --weights)")
    model = build_model(args.weights)
    x = crop(Path(args.image), args.size)
    with torch.no_grad():
        truth = load_model(model.state_dict()).double().eval()(x.double())
    fns = candidates(model, args.threads)
    times = time_interleaved(fns, x, {n: torch.float32 for n in fns}, "cpu", 2, args.rounds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    peers = [n for n in PEERS if n in medians]
    default_precision = openvino_precision()
    if default_precision == "f32" and "openvino default" in medians:
        peers.append("openvino default")  # f32 on this CPU: an fp32 peer too
    best = min(peers, key=medians.get)
    print(cpu_line())
    print(f"torch {torch.__version__}, fused kernels ISA {_native.isa('spab')}, "
          f"OpenVINO default precision {default_precision}; SPAN x{model.upscale} "
          f"C={model.feature_channels}, LR {tuple(x.shape)} crop of {Path(args.image).name}, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds")
    print(f"| candidate | ms | min ms | {best} / this | max error | mean error |")
    print("|---|---|---|---|---|---|")
    for name, fn in fns.items():
        error = (fn(x).double() - truth).abs()
        print(f"| {name} | {medians[name]:.1f} | {min(times[name]):.1f} | "
              f"{medians[best] / medians[name]:.2f}x | {error.max():.1e} | {error.mean():.1e} |")
    print(roofline_line(merge_span(model), x, medians[best], medians["dsclora fused fp32"], args.threads))


if __name__ == "__main__":
    main()
