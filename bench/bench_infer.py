"""Benchmark ``dsclora.infer`` against eager PyTorch, torch.compile and ONNX Runtime.

All candidates run the same merged eval-form weights and are timed interleaved (round-robin)
in one run; ratios are against eager PyTorch in the same dtype, measured in this run.

CPU (default): a 1x3x256x256 LR image, x4, fp32, ``--threads 2``; peak memory is the extra
resident memory of a first forward, measured in a child process per candidate.
GPU (``--device cuda``): a DIV2K-size LR image (1x3x339x510, x4) in fp16 against eager fp16 and
``torch.compile(mode="max-autotune")``, plus the NTIRE protocol (fp32, batch 1) next to eager
fp32; CUDA events around each forward, peak memory by ``max_memory_allocated``.

    python bench/bench_infer.py                       # CPU table
    python bench/bench_infer.py --device cuda         # GPU table
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dsclora import timing
from dsclora.infer import FusedSpan, merge_span
from dsclora_kernels import spab_reference
from dsclora.models import SPAN, load_model

SHARED = Path(os.environ.get("DSCLORA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DEFAULT_WEIGHTS = SHARED / "weights" / "dscf_x4_team23.pth"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def build_model(weights: str | None) -> SPAN:
    """The benchmark's SPAN: ``weights``, else the shared DSCF, else random C=26 weights
    (speed does not depend on the values)."""
    path = Path(weights) if weights else DEFAULT_WEIGHTS
    if path.is_file():
        return load_model(path)
    if weights:
        sys.exit(f"{weights}: no such file")
    model = SPAN(26, form="eval")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def candidates(model: SPAN, device: str, args) -> dict[str, tuple[str, callable]]:
    """name -> (dtype label, factory() -> fn(x)); x arrives on ``device`` in that dtype."""
    merged = merge_span(model)
    found = {}

    def eager(dtype, memory_format=torch.contiguous_format):
        module = load_model(model.state_dict()).to(device, dtype).to(memory_format=memory_format)
        return in_inference_mode(lambda x: module(x.contiguous(memory_format=memory_format)))

    for label in (["fp32"] if device == "cpu" else ["fp16", "fp32"]):
        dtype = DTYPES[label]
        found[f"eager {label}"] = (label, lambda d=dtype: eager(d))
        found[f"eager {label} channels_last"] = (label, lambda d=dtype: eager(d, torch.channels_last))
        found[f"dsclora.infer {label}"] = (label, lambda d=dtype: FusedSpan(merged, device, d))
        if device == "cpu":
            found[f"dsclora.infer {label}, NCHW tail"] = (
                label, lambda d=dtype: FusedSpan(merged, device, d, memory_format=torch.contiguous_format))
            found[f"dsclora.infer {label}, eager SPAB"] = (
                label, lambda d=dtype: FusedSpan(merged, device, d, spab=spab_reference))
        if args.compile and (device == "cpu" or label == "fp16"):
            mode = "max-autotune" if device == "cuda" else None
            found[f"torch.compile{'(max-autotune)' if mode else ''} {label}"] = (
                label, lambda d=dtype, m=mode: in_inference_mode(torch.compile(
                    load_model(model.state_dict()).to(device, d), mode=m)))
    if device == "cpu" and args.onnx and _onnx_available():
        found["onnxruntime fp32"] = ("fp32", lambda: _onnx_session(model, args.threads))
    return found


def in_inference_mode(fn):
    """fn(x) under torch.inference_mode."""
    def run(x):
        with torch.inference_mode():
            return fn(x)
    return run


def _onnx_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def _onnx_session(model: SPAN, threads: int):
    """fn(x) running ``model`` in an ONNX Runtime CPU session (the model exported to ONNX)."""
    import onnxruntime as ort

    from dsclora.export import export_onnx

    path = Path(tempfile.mkdtemp()) / "span.onnx"
    export_onnx(load_model(model.state_dict()), path)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def time_interleaved(fns: dict, x: torch.Tensor, dtypes: dict, device: str, warmup: int, repeats: int):
    """name -> list of per-call milliseconds, calls interleaved round-robin."""
    inputs = {name: x.to(device, dtypes[name]) for name in fns}
    calls = {name: (lambda fn=fn, x=inputs[name]: fn(x)) for name, fn in fns.items()}
    times = timing.interleaved(calls, device, warmup, repeats)
    return {name: [1e3 * t for t in seconds] for name, seconds in times.items()}


def cuda_peak_mb(fn, x) -> float:
    with timing.cuda_peak() as peak:
        fn(x)
    return peak.bytes / 2**20


def cpu_peak_mb(name: str, args) -> float | None:
    """Extra resident memory (MB) of candidate ``name``'s first forward, in a child process."""
    command = [sys.executable, __file__, "--child-peak", name, "--size", *map(str, args.size),
               "--threads", str(args.threads), "--no-compile"]
    if args.weights:
        command += ["--weights", args.weights]
    result = subprocess.run(command, capture_output=True, text=True)
    return json.loads(result.stdout)["peak_mb"] if result.returncode == 0 else None


def child_peak(args) -> None:
    """Print the extra peak RSS of one candidate's first forward (``timing.rss_growth``)."""
    model = build_model(args.weights)
    fn = candidates(model, "cpu", args)[args.child_peak][1]()
    x = torch.rand(1, 3, *args.size)
    print(json.dumps({"peak_mb": timing.rss_growth(lambda: fn(x)) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--weights", help="checkpoint (default: the shared DSCF x4, else random weights)")
    parser.add_argument("--size", type=int, nargs=2, help="LR height width (default 256 256 CPU, 339 510 GPU)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per candidate")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip ONNX Runtime")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the CPU peak-memory pass")
    parser.add_argument("--child-peak", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or ([256, 256] if args.device == "cpu" else [339, 510])
    torch.set_num_threads(args.threads)
    if args.child_peak:
        return child_peak(args)
    gpu = args.device == "cuda"
    repeats = args.repeats or (50 if gpu else 7)
    warmup = args.warmup or (10 if gpu else 2)
    model = build_model(args.weights)
    found = candidates(model, args.device, args)
    dtypes = {name: DTYPES[label] for name, (label, _) in found.items()}
    fns = {name: factory() for name, (_, factory) in found.items()}
    x = torch.rand(1, 3, *args.size)
    times = time_interleaved(fns, x, dtypes, args.device, warmup, repeats)
    medians = timing.medians(times)
    where = torch.cuda.get_device_name() if gpu else f"CPU, {args.threads} threads"
    print(f"SPAN x{model.upscale} C={model.feature_channels}, LR 1x3x{args.size[0]}x{args.size[1]}, {where}, "
          f"torch {torch.__version__}; median of {repeats} interleaved calls")
    print(f"{'candidate':44s} {'ms':>9s} {'min ms':>9s} {'vs eager':>9s} {'peak MB':>9s}")
    for name, (label, _) in found.items():
        if gpu:
            peak = cuda_peak_mb(fns[name], x.to("cuda", dtypes[name]))
        else:
            peak = cpu_peak_mb(name, args) if args.memory and not name.startswith("torch.compile") else None
        ratio = medians[f"eager {label}"] / medians[name]
        peak_text = f"{peak:9.1f}" if peak is not None else f"{'-':>9s}"
        print(f"{name:44s} {medians[name]:9.2f} {min(times[name]):9.2f} {ratio:8.2f}x {peak_text}")


if __name__ == "__main__":
    main()
