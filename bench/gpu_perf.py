"""Every GPU figure of issues 19 and 20 in one run: ``python bench/gpu_perf.py`` (under 4 minutes on an H200).

Sections (each in its own child process with its own timeout, so that a crash or a hang loses
only that section; ``--sections`` picks some):

- spab_forward: SPAB forward fp32/fp16/bf16 at 1x26x512x512 and 8x48x128x128: fused vs eager
  (NCHW and channels-last; cuDNN, TF32 allowed as PyTorch defaults) vs torch.compile (16-bit);
  max error of fused and eager against float64.
- spab_train: SPAB forward + backward (all gradients), fused vs eager, peak memory.
- network: SPAN-Tiny 1x3x270x480 -> 1080p fp16/fp32: dsclora.infer's FusedSpan vs eager,
  eager channels-last, torch.compile (fp16); peak memory; frames/s for batches of 16 frames.
- affinity: spatial_affinity_loss forward + backward, B=8, 26/28 channels, 64/128/256 px,
  fused vs the naive reference (skipped where its N x N buffers do not fit).
- train_step: a DSCLoRA step (SPAN-Tiny + LoRA student, SPAN ch28 teacher, rec 1 / ts 0.1 /
  ad 0.01 on the six block features, Adam) on random in-memory batches: it/s at 256-px patches
  batch 16 and 512-px batch 8, fused and unfused blocks, and a torch.profiler table of the top ops.

All candidates of a table are timed interleaved in one run (medians after warm-up, CUDA events);
ratios are against eager PyTorch measured in the same run. The output is a markdown block for
bench/RESULTS.md (card, date, commit, versions); ``--out FILE`` also writes it to FILE.
Weights come from ``$DSCLORA_SHARED/weights`` (default ../shared) when present, else random
weights of the same shapes (speed does not depend on the values).

``--smoke`` runs every section on CPU tensors with tiny shapes (a check that the script works,
no figures); ``--backend triton`` with TRITON_INTERPRET=1 runs the fused ops' Triton kernels there.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks' helpers
from dsclora import timing  # noqa: E402
from bench_spab import block_inputs, interleaved, training_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: $DSCLORA_SHARED, else the checkout's shared/ or ../shared (weights are optional)
SHARED = Path(os.environ.get("DSCLORA_SHARED") or next(
    (p for p in (ROOT / "shared", ROOT.parent / "shared") if p.is_dir()), ROOT.parent / "shared"))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Settings(NamedTuple):
    """What a section needs to know about the run."""

    device: str
    smoke: bool
    repeats: int
    compile_backend: str  # "inductor"; "eager" in smoke mode (dynamo's path without the code generation)


# ---- small helpers ---------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_mib(fn: Callable, device: str) -> float | None:
    """Extra peak device memory (MiB) of one call of fn; None on the CPU."""
    if device != "cuda":
        return None
    with timing.cuda_peak() as peak:
        fn()
    return peak.bytes / 2**20


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def ratio(baseline: float | None, candidate: float | None) -> str:
    """baseline / candidate as 'N.NNx' (> 1: the candidate is faster)."""
    return "-" if baseline is None or candidate is None else f"{baseline / candidate:.2f}x"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def shared_weights(name: str) -> Path | None:
    path = SHARED / "weights" / name
    return path if path.is_file() else None


def span(weights: str, channels: int, note: list[str]):
    """An eval-form SPAN from the shared checkpoint ``weights``, else random weights of C=channels."""
    from dsclora.models import SPAN
    from dsclora.train.networks import load_span

    path = shared_weights(weights)
    if path is not None:
        return load_span(str(path), weights)
    note.append(f"{weights} not found under {SHARED / 'weights'}: random weights of the same shapes")
    torch.manual_seed(channels)
    model = SPAN(channels, form="eval")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def compiled(fn: Callable, settings: Settings) -> Callable:
    return torch.compile(fn, backend=settings.compile_backend)


# ---- sections --------------------------------------------------------------------------------

def spab_forward(settings: Settings) -> list[str]:
    """SPAB forward: fused vs eager vs torch.compile, max error vs float64."""
    from dsclora_kernels import spab, spab_reference

    shapes = [(1, 26, 12, 12)] if settings.smoke else [(1, 26, 512, 512), (8, 48, 128, 128)]
    dtypes = ["fp32"] if settings.smoke else ["fp32", "fp16", "bf16"]
    rows = []
    for shape in shapes:
        for label in dtypes:
            torch.manual_seed(0)
            nchw = block_inputs(shape, DTYPES[label], settings.device, torch.contiguous_format)
            last = [nchw[0].contiguous(memory_format=torch.channels_last), *nchw[1:]]
            candidates = {"fused": lambda: spab(*last), "eager": lambda: spab_reference(*nchw),
                          "eager channels-last": lambda: spab_reference(*last)}
            if label != "fp32" or settings.smoke:
                block = compiled(spab_reference, settings)
                candidates["torch.compile"] = lambda: block(*last)
            with torch.no_grad():
                t = interleaved(candidates, settings.device, settings.repeats)
                exact = spab_reference(*(v.double() for v in nchw))[0]
                err = {name: (candidates[name]()[0].double() - exact).abs().max().item() for name in ("fused", "eager")}
            best = min(v for k, v in t.items() if k != "fused")
            rows.append(["x".join(map(str, shape)), label, ms(t["fused"]), ms(t["eager"]), ms(t["eager channels-last"]),
                         ms(t.get("torch.compile")), ratio(t["eager"], t["fused"]), ratio(t.get("torch.compile"), t["fused"]),
                         ratio(best, t["fused"]), f"{err['fused']:.1e}", f"{err['eager']:.1e}"])
    return ["SPAB forward, ms (median; speed-up = baseline / fused; errors: max |. - float64|)", "",
            *md_table(["shape", "dtype", "fused", "eager", "eager CL", "torch.compile", "vs eager",
                       "vs compile", "vs best", "fused err", "eager err"], rows)]


def spab_train(settings: Settings) -> list[str]:
    """SPAB forward + backward (all inputs require grad): fused vs eager, peak memory."""
    cases = ([((1, 26, 12, 12), "fp32")] if settings.smoke else
             [((1, 26, 512, 512), "fp32"), ((1, 26, 512, 512), "fp16"), ((8, 48, 128, 128), "fp16")])
    rows = []
    for shape, label in cases:
        torch.manual_seed(0)
        inputs = block_inputs(shape, DTYPES[label], settings.device, torch.channels_last, requires_grad=True)
        t, _saved, peak = training_table(inputs[0], inputs[1:], settings.device, settings.repeats)
        fused, eager = t["fused spab fwd+bwd"], t["eager fwd+bwd"]
        memory = (f"{peak['fused spab fwd+bwd'] / 2**20:.0f} / {peak['eager fwd+bwd'] / 2**20:.0f}"
                  if peak else "-")
        rows.append(["x".join(map(str, shape)), label, ms(fused), ms(eager), ratio(eager, fused), memory])
    return ["SPAB forward + backward (all gradients), ms", "",
            *md_table(["shape", "dtype", "fused", "eager", "vs eager", "peak MiB fused / eager"], rows)]


def network(settings: Settings) -> list[str]:
    """Whole SPAN-Tiny 270x480 -> 1080p: FusedSpan vs eager vs channels-last vs torch.compile; batch 16 frames/s."""
    from dsclora.infer import FusedSpan, merge_span

    note = []
    model = span("spantiny_ch26_x4_ntire24.pth", 26, note).to(settings.device).eval()
    merged = merge_span(model)
    size = (12, 16) if settings.smoke else (270, 480)
    batch = 2 if settings.smoke else 16
    dtypes = ["fp32"] if settings.smoke else ["fp16", "fp32"]
    candidates, inputs, baseline = {}, {}, {}
    for label in dtypes:
        dtype = DTYPES[label]
        eager = _eval_copy(model, dtype, torch.contiguous_format)
        eager_cl = _eval_copy(model, dtype, torch.channels_last)
        x = torch.rand(1, 3, *size, device=settings.device, dtype=dtype)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        candidates[f"dsclora fused {label}"] = FusedSpan(merged, settings.device, dtype)
        candidates[f"eager {label}"] = eager
        candidates[f"eager {label} channels-last"] = eager_cl
        inputs.update({f"dsclora fused {label}": x, f"eager {label}": x, f"eager {label} channels-last": x_cl})
        if label == "fp16" or settings.smoke:
            candidates[f"torch.compile {label}"] = compiled(_eval_copy(model, dtype, torch.contiguous_format), settings)
            inputs[f"torch.compile {label}"] = x
        baseline.update({name: f"eager {label}" for name in candidates if name not in baseline})
    calls = {name: (lambda f=fn, v=inputs[name]: f(v)) for name, fn in candidates.items()}
    with torch.inference_mode():
        t = interleaved(calls, settings.device, settings.repeats)
        rows = [[name, ms(t[name]), ratio(t[baseline[name]], t[name]), _fmt(peak_mib(call, settings.device))]
                for name, call in calls.items()]
        label = dtypes[0]
        frames = torch.rand(batch, 3, *size, device=settings.device, dtype=DTYPES[label])
        frames_cl = frames.contiguous(memory_format=torch.channels_last)
        per_batch = interleaved({"fused": lambda: candidates[f"dsclora fused {label}"](frames),
                                 "eager channels-last": lambda: candidates[f"eager {label} channels-last"](frames_cl)},
                                settings.device, max(3, settings.repeats // 4))
    h, w = size
    lines = [f"Whole network SPAN-Tiny x4, LR 1x3x{h}x{w} -> {4 * h}x{4 * w}, ms", "", *note,
             *md_table(["candidate", "ms", "vs eager same dtype", "peak MiB"], rows), "",
             f"Batch of {batch} frames, {label}: fused {batch / per_batch['fused']:.0f} frames/s, "
             f"eager channels-last {batch / per_batch['eager channels-last']:.0f} frames/s"]
    return lines


def _eval_copy(model, dtype, memory_format) -> Callable:
    from dsclora.models import load_model

    module = load_model(model.state_dict()).to(next(model.parameters()).device, dtype)
    return module.to(memory_format=memory_format).eval()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def affinity(settings: Settings) -> list[str]:
    """spatial_affinity_loss fwd + bwd, fused vs naive, time and peak memory."""
    from bench_affinity import inputs, naive_bytes, step

    batch, sides = (1, [4, 8]) if settings.smoke else (8, [64, 128, 256])
    limit = 0.6 * torch.cuda.get_device_properties(0).total_memory if settings.device == "cuda" else 2**28
    rows = []
    for side in sides:
        student, teacher = inputs(batch, side, settings.device)
        candidates = {"fused": lambda: step("fused", student, teacher)}
        if naive_bytes(batch, side) < limit:
            candidates["naive"] = lambda: step("naive", student, teacher)
        repeats = max(2, settings.repeats // (1 if side <= 64 else 4 if side <= 128 else 10))
        t = interleaved(candidates, settings.device, repeats)
        memory = {name: peak_mib(fn, settings.device) for name, fn in candidates.items()}
        rows.append([f"{side}x{side}", ms(t["fused"]), ms(t.get("naive")), ratio(t.get("naive"), t["fused"]),
                     _fmt(memory["fused"]), _fmt(memory.get("naive"))])
    return [f"Affinity loss fwd + bwd, B={batch}, 26/28 channels, fp32 features, default precision, ms "
            "(naive: '-' where its N x N buffers do not fit)", "",
            *md_table(["H=W", "fused", "naive", "vs naive", "peak MiB fused", "peak MiB naive"], rows)]


def train_step(settings: Settings) -> list[str]:
    """DSCLoRA training step: it/s per patch size and batch, fused / unfused blocks; profiler table."""
    from dsclora.losses import DSCLoRALoss
    from dsclora.lora import apply_dsclora

    note = []
    student = span("spantiny_ch26_x4_ntire24.pth", 26, note)
    apply_dsclora(student)
    student.to(settings.device).train()
    teacher = span("span_ch28_x4_ntire24.pth", 28, note).to(settings.device).eval().requires_grad_(False)
    loss_fn = DSCLoRALoss(1.0, 0.1, 0.01)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-5)

    def one_step(lr, hr):
        sr_s, f_s = student(lr, return_features=True)
        with torch.no_grad():
            sr_t, f_t = teacher(lr, return_features=True)
        total, _ = loss_fn(sr_s, hr, sr_t, f_s, f_t)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    setups = [(16, 2)] if settings.smoke else [(256, 16), (512, 8)]
    steps = 2 if settings.smoke else 10
    rows, profile = [], []
    for patch, batch in setups:
        lr = torch.rand(batch, 3, patch // 4, patch // 4, device=settings.device)
        hr = torch.rand(batch, 3, patch, patch, device=settings.device)
        for fused in (True, False):
            for model in (student, teacher):
                model.use_fused_blocks(fused)
            one_step(lr, hr)  # warm-up: compiles, autotunes
            synchronize(settings.device)
            seconds = timing.call_seconds(lambda: [one_step(lr, hr) for _ in range(steps)], settings.device)
            rows.append([f"{patch} px", str(batch), "fused" if fused else "unfused", f"{steps / seconds:.2f}"])
            if fused and not profile:
                profile = _profile(lambda: one_step(lr, hr), settings.device, f"{patch}-px patches, batch {batch}")
    return ["DSCLoRA training step (random in-memory batches: no data loading), it/s", "", *note,
            *md_table(["patch (HR)", "batch", "blocks", "it/s"], rows), "", *profile]


def _profile(fn: Callable, device: str, what: str, top: int = 15) -> list[str]:
    """torch.profiler's top ops (by self device time on CUDA, self CPU time otherwise) over 3 calls."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        synchronize(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=50)
    return [f"torch.profiler, 3 steps, {what}, top {top} by {key}:", "", "```", table.strip(), "```"]


SECTIONS: dict[str, tuple[Callable[[Settings], list[str]], int]] = {  # name -> (function, timeout s)
    "spab_forward": (spab_forward, 120),  # four torch.compile builds
    "spab_train": (spab_train, 40),
    "network": (network, 90),
    "affinity": (affinity, 40),
    "train_step": (train_step, 60),
}


# ---- the run ---------------------------------------------------------------------------------

def header(device: str) -> list[str]:
    import triton

    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"### bench/gpu_perf.py on {card}", "",
            f"{now}, commit {commit}, torch {torch.__version__}, Triton {triton.__version__}, "
            f"CUDA {torch.version.cuda}, TF32 convs {'allowed' if torch.backends.cudnn.allow_tf32 else 'off'}"]


def run_child(name: str, args) -> list[str]:
    """Run section ``name`` in a child process under its timeout; its markdown, or why it failed."""
    limit = args.timeout or SECTIONS[name][1] * (4 if args.smoke else 1)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        command = [sys.executable, __file__, "--child", name, "--result", result.name, "--repeats", str(args.repeats),
                   "--backend", args.backend, *(["--smoke"] if args.smoke else [])]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return [f"**{name}: TIMEOUT after {limit} s**"]
        seconds = time.perf_counter() - start
        if done.returncode:
            return [f"**{name}: FAILED (exit {done.returncode}, {seconds:.0f} s)**", "", "```",
                    done.stderr.strip()[-3000:], "```"]
        return json.load(result) + ["", f"({name}: {seconds:.0f} s)"]


def run_section(name: str, args) -> list[str]:
    """Section ``name`` in this process (the child's work)."""
    from dsclora_kernels._dispatch import use_backend

    device = "cpu" if args.smoke else "cuda"
    repeats = args.repeats or (2 if args.smoke else 20)
    settings = Settings(device, args.smoke, repeats, "eager" if args.smoke else "inductor")
    torch.manual_seed(0)
    if args.backend == "default":
        return SECTIONS[name][0](settings)
    with use_backend(args.backend):
        return SECTIONS[name][0](settings)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU tensors: a check, no figures")
    parser.add_argument("--backend", default="default", choices=("default", "triton", "cpp", "reference"),
                        help="force the fused ops' backend (dsclora_kernels.use_backend)")
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds per table (default 20; smoke 2)")
    parser.add_argument("--timeout", type=int, default=0, help="seconds per section (default: its own)")
    parser.add_argument("--out", help="also write the markdown block to this file")
    parser.add_argument("--child", choices=list(SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        lines = run_section(args.child, args)
        Path(args.result).write_text(json.dumps(lines))
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_perf.py: no CUDA device (use --smoke for a CPU check of the script)", file=sys.stderr)
        return 2
    lines = header("cpu" if args.smoke else "cuda")
    failed = 0
    for name in args.sections:
        print(f"== {name} ...", file=sys.stderr, flush=True)
        section = run_child(name, args)
        failed += section[0].startswith("**")
        lines += ["", *section]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
