"""Run the reliability scenarios and write tests/RELIABILITY.md (never edit that file by hand).

    python tests/reliability_report.py [--seeds 3] [--output tests/RELIABILITY.md]

The scenarios are the ones tests/test_reliability_*.py and tests/test_properties.py assert on
(tests/corpus.py, tests/hostile_checkpoints.py, tests/crash_harness.py); this script records what
each one did, with the numbers, then runs those four test files once for their pass count and time.
"""
import argparse
import datetime
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import corpus  # noqa: E402
import crash_harness  # noqa: E402
import hostile_checkpoints  # noqa: E402

TEST_FILES = ["tests/test_reliability_inputs.py", "tests/test_reliability_checkpoints.py",
              "tests/test_reliability_training.py", "tests/test_properties.py"]


def cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def outcome_table(outcomes) -> str:
    return table(["case", "what", "expected", "got", "ok"],
                 [[f"`{o.name}`", o.what if o.what != o.name else "", o.expected, o.got, mark(o.passed)]
                  for o in outcomes])


def mark(ok: bool) -> str:
    return "yes" if ok else "**NO**"


# ---------------------------------------------------------------- 1. inputs
def inputs_section(work: Path, summary: list) -> str:
    from dsclora.data import load_image
    from dsclora.infer import Upscaler, merge_span
    from dsclora.infer.batch import upscale_image

    work.mkdir(parents=True)
    weights = work / "tiny.pth"
    torch.save(corpus.tiny_span().state_dict(), weights)
    upscaler = Upscaler(merge_span(corpus.tiny_span()))
    files = corpus.build_files(work / "corpus" / "files")
    inputs = corpus.build_inputs(work / "corpus" / "inputs")
    file_outcomes = [corpus.check_file(work / "corpus" / "files", case) for case in files]

    start = time.perf_counter()
    arguments = [str(work / "corpus" / "files"), str(work / "corpus" / "files" / "dangling.png"),
                 *(c.argument for c in inputs)]
    batch = corpus.cli_batch(arguments, work / "out", weights, "--ext", "png", "--tile", str(corpus.TILE))
    seconds = time.perf_counter() - start
    good = [c for c in files if c.error is None]
    expected_failures = {str(work / "corpus" / "files" / c.name): c.error for c in files if c.error}
    expected_failures.update({c.argument: c.error for c in inputs})
    named = sum(corpus.reason_matches(batch.failures.get(name, ""), reason)
                for name, reason in expected_failures.items())
    worst = 0.0
    for case in good:
        source = load_image(work / "corpus" / "files" / case.name)
        written = load_image(work / "out" / f"{Path(case.name).stem}.png")
        rgb, _ = upscale_image(upscaler, source)
        if source.gray:
            rgb = rgb.mean(axis=2, keepdims=True).repeat(3, axis=2)
        worst = max(worst, float(np.abs(written.rgb - rgb).max()) * (2**source.bit_depth - 1))
    input_rows = [[f"`{Path(c.argument).name}`", c.what, c.error, batch.failures.get(c.argument, "(not reported)"),
                   mark(corpus.reason_matches(batch.failures.get(c.argument, ""), c.error))] for c in inputs]

    folder_run, folder = corpus.unwritable_folder(work / "unwritable", weights)
    writes = corpus.write_failures(work / "writes", weights)
    write_reasons = {Path(n).name: r for n, r in writes.failures.items()}
    api_outcomes = [corpus.check_api(upscaler, case) for case in corpus.api_cases()]

    batch_ok = (batch.code == 1 and named == len(expected_failures) and len(batch.failures) == len(expected_failures)
                and batch.outputs == sorted(f"{Path(c.name).stem}.png" for c in good) and not batch.leftovers
                and worst <= 0.5 + 1e-3)
    writes_ok = (writes.code == 1 and not writes.leftovers and writes.outputs == ["blocked_up.png", "fine_up.png"]
                 and all(reason in write_reasons.get(name, "") for name, reason in corpus.WRITE_FAILURES.items()))
    folder_ok = folder_run.code == 2 and "Not a directory" in folder_run.stderr
    summary += [
        ["image files read by `load_image`", len(file_outcomes), sum(o.passed for o in file_outcomes)],
        ["`dsclora infer` batch over the corpus", 1, int(batch_ok)],
        ["inputs that are not image files", len(inputs), sum(r[-1] == "yes" for r in input_rows)],
        ["outputs that cannot be written", 1 + len(corpus.WRITE_FAILURES), int(folder_ok) + 3 * int(writes_ok)],
        ["tensors/arrays passed to `Upscaler`", len(api_outcomes), sum(o.passed for o in api_outcomes)],
    ]
    summary_line = batch.stderr.strip().splitlines()
    summary_line = next((line for line in summary_line if "inputs upscaled" in line), "")
    return f"""## 1. Bad and unusual inputs

Corpus: {len(files)} image files, {len(inputs)} other command-line inputs and {len(api_outcomes)} API inputs,
all generated by `tests/corpus.py`.

### Image files through `dsclora.data.load_image`

A valid file must give exactly the pixels written (lossless formats; JPEG: the size), the right
gray/alpha/bit depth; a broken one one `ImageReadError` starting with the file's path, with the reason.

{outcome_table(file_outcomes)}

### `dsclora infer` over the whole corpus (one batch, `--ext png --tile {corpus.TILE}`)

| measure | value |
|---|---|
| exit code | {batch.code} (1 = some inputs failed) |
| summary line | `{cell(summary_line)}` |
| failures listed in the summary / expected | {len(batch.failures)} / {len(expected_failures)} |
| of which with the expected reason | {named} |
| outputs written / valid images | {len(batch.outputs)} / {len(good)} |
| temporary or partial files left in the output folder | {len(batch.leftovers)} |
| max \\|tiled CLI output − untiled API output\\| (in output quantisation steps) | {worst:.2f} |
| wall time | {seconds:.1f} s |

Inputs that are not image files (same batch):

{table(["input", "what", "expected reason", "reported", "ok"], input_rows)}

### Outputs that cannot be written

Tests run as root, which ignores permission bits, so `chmod` cannot make a folder unwritable here;
these fail for root too.

| case | exit code | reported | ok |
|---|---|---|---|
| output folder under a regular file (`{folder.relative_to(work)}`) | {folder_run.code} | \
{cell(folder_run.stderr.strip())} | {mark(folder_ok)} |
""" + "".join(
        f"| `{name[:24]}{'…' if len(name) > 24 else ''}`: {reason} | {writes.code} | "
        f"{cell(write_reasons.get(name, '(not reported)'))} | {mark(reason in write_reasons.get(name, ''))} |\n"
        for name, reason in corpus.WRITE_FAILURES.items()) + f"""
The same batch wrote `fine.png`; output folder afterwards: {writes.outputs} (the folder `blocked_up.png` was
there before), temporary files left: {len(writes.leftovers)}.

### Tensors and arrays passed to `Upscaler`

{outcome_table(api_outcomes)}
"""


# ---------------------------------------------------------------- 2. checkpoints
def checkpoints_section(work: Path, summary: list) -> str:
    from dsclora.infer import load as load_upscaler
    from dsclora.models import load_model, read_state_dict
    from dsclora.train import Trainer, checkpoint, load_config
    from dsclora.train.networks import load_span

    work.mkdir(parents=True)
    marker = work / "code_ran.txt"
    cases = hostile_checkpoints.build(work / "files", marker)
    outcomes = [hostile_checkpoints.check(work / "files", case) for case in cases]
    routes = {"read_state_dict": read_state_dict, "load_model": load_model, "dsclora.infer.load": load_upscaler,
              "trainer model.base": lambda p: load_span(str(p), "base")}
    refused = {}
    for name in ("pickle_exec.pth", "pickle_exec_in_weights.pth"):
        for route, load in routes.items():
            try:
                load(work / "files" / name)
                refused[(name, route)] = False
            except ValueError as exc:  # CheckpointError and ConfigError
                refused[(name, route)] = "refused" in str(exc)
    ran_safely = marker.exists()
    control = work / "control.txt"
    torch.save(hostile_checkpoints.Payload(control), work / "control.pth")
    torch.load(work / "control.pth", weights_only=False)

    root = work / "resume"
    config_path = crash_harness.make_setup(root)
    config = load_config(config_path, [f"run_dir={root / 'run'}", "deterministic=false",
                                       "stages.0.iterations=1", "stages.1.iterations=1"])
    Trainer(config).run()
    tensors, _ = checkpoint.load(root / "run" / "checkpoints", "last")
    lora = next(k for k in tensors if k.startswith("lora."))
    slot = next(k for k in tensors if k.startswith("optim.") and tensors[k].dim() > 0)
    resume = [hostile_checkpoints.check_resume(config, case, root / "run", root / f"case{i}")
              for i, case in enumerate(hostile_checkpoints.resume_cases(lora, "ema." + lora[5:], slot))]
    summary += [
        ["model checkpoints through `load_model`", len(outcomes), sum(o.passed for o in outcomes)],
        ["pickled code refused without running (files × routes)", len(refused),
         sum(refused.values()) if not ran_safely else 0],
        ["damaged resume checkpoints", len(resume), sum(o.passed for o in resume)],
    ]
    route_rows = [[f"`{name}`", route, mark(ok)] for (name, route), ok in refused.items()]
    return f"""## 2. Hostile and broken checkpoints

### Model checkpoints through `dsclora.models.load_model`

Each must load, or give one `CheckpointError` starting with the file's path, with the reason and the key.

{outcome_table(outcomes)}

### Pickled code never runs

`Payload` unpickles to a call of `exec` that would create `{marker.name}`.

{table(["file", "loaded through", "refused"], route_rows)}

| check | result |
|---|---|
| marker file created by any of the loads above | {"**YES**" if ran_safely else "no"} |
| control: the same payload loaded with `torch.load(weights_only=False)` creates its marker | \
{mark(control.exists())} |

(`dsclora infer --weights` and `dsclora eval --weights` are checked the same way in
`tests/test_reliability_checkpoints.py`.)

### The trainer's resume checkpoint (`checkpoints/last.json` + `last-<iteration>.safetensors`)

A copy of a finished run's folder is damaged, then `Trainer(config, resume=True)` must give one error
naming the file (and the tensor or entry).

{outcome_table(resume)}
"""


# ---------------------------------------------------------------- 3. crashes
def crash_section(work: Path, seeds: int, summary: list) -> str:
    config = crash_harness.make_setup(work)
    snapshots = work / "snapshots"
    snapshots.mkdir()
    start = time.perf_counter()
    reference = crash_harness.run(config, work / "reference", snapshot_dir=snapshots)
    reference_seconds = time.perf_counter() - start
    assert reference.code == 0, reference.stderr
    total = sum(crash_harness.ITERATIONS)
    moments = [crash_harness.kill_at_moment(config, work / f"moment{i}", snapshots, work / "reference", moment)
               for i, moment in enumerate(crash_harness.PAUSE_EVENTS)]
    moment_rows = [[m.moment.replace("K", str(m.k)), ", ".join(f"`{f}`" for f in m.after_kill),
                    f"{m.found[0]} ({mark(m.found[1])})", m.resumed_at, ", ".join(f"`{f}`" for f in m.after_resume),
                    mark(not m.differences), mark(m.ok)] for m in moments]
    rows, finals, all_kills = [], [], []
    for seed in range(seeds):
        start = time.perf_counter()
        kills, final = crash_harness.kill_and_resume(config, work / f"seed{seed}", snapshots, seed,
                                                     reference.step_seconds())
        seconds = time.perf_counter() - start
        found, identical = crash_harness.matches_snapshot(work / f"seed{seed}", snapshots)
        differences = crash_harness.differing_outputs(work / f"seed{seed}", work / "reference")
        leftovers = [f for f in crash_harness.checkpoint_files(work / f"seed{seed}")
                     if f not in ("last.json", f"last-{total:09d}.safetensors")]
        finals.append([seed, len(kills), final.code, f"{found}/{total}", mark(identical),
                       mark(not differences), len(leftovers), f"{seconds:.1f} s"])
        for i, k in enumerate(kills, 1):
            all_kills.append(k)
            rows.append([seed, i, k.kind, f"`{k.last_event}`", k.completed, k.found,
                         mark(k.found in k.allowed), mark(k.identical), k.resumed_at,
                         ", ".join(f"`{f}`" for f in k.leftovers) or "none"])

    disk_rows = []
    for file in ("last-000000003.safetensors for 3", "last.json for 3"):
        run_dir = work / f"disk_full_{file.split()[0]}"
        full = crash_harness.run(config, run_dir, disk_full_on=file)
        after = crash_harness.matches_snapshot(run_dir, snapshots)
        files = crash_harness.checkpoint_files(run_dir)
        resumed = crash_harness.run(config, run_dir, resume=True)
        message = next((line for line in full.stderr.splitlines() if "cannot save" in line), full.stderr)
        ok = (full.code == 1 and after == (2, True) and len(files) == 2 and resumed.code == 0
              and not crash_harness.differing_outputs(run_dir, work / "reference"))
        disk_rows.append([f"`{file.split()[0]}` of checkpoint 3", full.code, message, f"{after[0]} ({mark(after[1])})",
                          ", ".join(files), mark(resumed.code == 0), mark(ok)])

    term = crash_harness.run(config, work / "sigterm", kill_after=("step 3", 0.0), signum=signal.SIGTERM)
    term_after = crash_harness.matches_snapshot(work / "sigterm", snapshots)
    code, err = crash_harness.ctrl_c(config, work / "sigint", 1, "checkpoint_every=100")
    int_after = crash_harness.matches_snapshot(work / "sigint", snapshots)
    int_resumed = crash_harness.run(config, work / "sigint", resume=True)
    int_same = not crash_harness.differing_outputs(work / "sigint", work / "reference")
    int_message = next((line for line in err.splitlines() if "stopped at" in line), err.strip()[-300:])
    term_message = next((line for line in term.stderr.splitlines() if "stopped at" in line), term.stderr)
    signal_rows = [
        ["SIGTERM to a forked `dsclora train` after step 3 began", term.code, term_message,
         f"{term_after[0]} ({mark(term_after[1])})", "n/a", mark(term.code == 130 and term_after[1])],
        ["Ctrl+C: SIGINT to the process group of a real `dsclora train` (1 DataLoader worker, checkpoints "
         "otherwise due at 8) after its first logged iteration", code, int_message,
         f"{int_after[0]} ({mark(int_after[1])})",
         mark(int_resumed.code == 0 and int_same),
         mark(code == 130 and "Traceback" not in err and int_after[1] and int_same)],
    ]
    summary += [
        ["SIGKILL at each named moment: exactly the expected files, resumed to an identical end", len(moments),
         sum(m.ok for m in moments)],
        ["SIGKILLs: last complete checkpoint found, bit-identical, resumed from", len(all_kills),
         sum(k.found in k.allowed and k.identical and k.resumed_at == k.found for k in all_kills)],
        ["killed runs finishing bit-identical to an uninterrupted run", len(finals),
         sum(r[4] == r[5] == "yes" and r[6] == 0 for r in finals)],
        ["full disk while saving (tensor file, JSON)", len(disk_rows), sum(r[-1] == "yes" for r in disk_rows)],
        ["SIGTERM / Ctrl+C stop with a checkpoint", len(signal_rows), sum(r[-1] == "yes" for r in signal_rows)],
    ]
    stages = " + ".join(str(n) for n in crash_harness.ITERATIONS)
    return f"""## 3. Crashes during training

Setup (`tests/crash_harness.py`): student SPAN C=8 x2 with ConvLoRA, teacher SPAN C=10, {stages} iterations
(16- then 24-pixel patches, batch 2), a checkpoint every iteration, deterministic algorithms, one thread.
Runs are forked `dsclora train [--resume]` processes that report their progress through a pipe; a
kill during a save pauses the child right after the reported moment, so that SIGKILL lands exactly
there; a random kill comes up to one step time ({reference.step_seconds() * 1000:.0f} ms, the median of the
uninterrupted run) after a step began. The uninterrupted run took {reference_seconds:.1f} s and kept a copy of
each of its {total} checkpoints.

### SIGKILL at each named moment (checkpoint or step 3), then a resume to the end

Every case is reached on every run, whatever the machine's speed; the expected files are
`crash_harness.expected_after_kill` (temporaries are ours: `.NAME.XXXXXXXX.tmp`, removed by the next save).

{table(["moment", "files in checkpoints/ after the kill", "checkpoint after (identical)", "resumed at",
        "files at the end", "exported weights and log identical", "ok"], moment_rows)}

### SIGKILL sequences (seeds 0..{seeds - 1}, 6 kills each, resuming after each; exploration)

Four kills at seeded named moments, two at seeded random times.

"last complete" is the last checkpoint whose JSON had been renamed into place according to the events;
"found" the checkpoint on disk after the kill (the event of a rename can die with the process, so the
next one is allowed only when its JSON had been written); "identical": tensors and JSON equal, bit for bit,
the uninterrupted run's checkpoint of that iteration; "resumed at": the first step the next run took.
Leftovers are removed by the next save.

{table(["seed", "#", "kill", "last event", "last complete", "found", "allowed", "identical", "resumed at",
        "leftovers beside it"], rows)}

{table(["seed", "kills", "final exit code", "final checkpoint", "final checkpoint identical",
        "exported weights and log identical", "leftovers at the end", "time (all runs)"], finals)}

### Disk full while saving (the write of one file fails half-way with ENOSPC)

{table(["failing write", "exit code", "message", "checkpoint after (identical)", "files in checkpoints/",
        "resumes", "ok"], disk_rows)}

### Stop signals

{table(["signal", "exit code", "message", "checkpoint after (identical)", "resumed to an identical end", "ok"],
       signal_rows)}
"""


# ---------------------------------------------------------------- 4. test runs
def tests_section(summary: list) -> str:
    root = HERE.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    process = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
                              "--hypothesis-show-statistics", *TEST_FILES], cwd=root, env=env,
                             capture_output=True, text=True)
    seconds = time.perf_counter() - start
    out = process.stdout
    per_file = {name: 0.0 for name in TEST_FILES}
    for match in re.finditer(r"^([\d.]+)s (?:call|setup|teardown)\s+(tests/\S+?\.py)::", out, re.M):
        per_file[match[2]] = per_file.get(match[2], 0.0) + float(match[1])
    result = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?) in ([\d.]+)s", out, re.M)
    failures = "\n".join(f"- `{cell(line)}`" for line in out.splitlines() if line.startswith(("FAILED", "ERROR")))
    statistics = re.findall(r"^(tests/test_properties\.py::\S+):\n(?:.*\n)*?\s+- (\d+) passing, (\d+) failing",
                            out, re.M)
    summary.append(["test files (pytest)", 1, int(process.returncode == 0)])
    rows = [[f"`{name}`", f"{t:.1f} s"] for name, t in per_file.items()]
    stat_rows = [[f"`{name.split('::')[1]}`", passing, failing] for name, passing, failing in statistics]
    return f"""## 4. The test files

`OMP_NUM_THREADS=1 pytest {' '.join(TEST_FILES)}`: {result[-1][0] if result else 'no result'} (exit code
{process.returncode}), {seconds:.0f} s wall time including start-up; budget 150 s.
{failures}

{table(["file", "time (sum of its tests' setup + call)"], rows)}

Hypothesis examples per property (derandomised, fixed per test; C++ backend broadly, Triton interpreted tiny):

{table(["property", "passing examples", "failing"], stat_rows)}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="crash sequences of 6 kills each (default 3)")
    parser.add_argument("--output", default=str(HERE / "RELIABILITY.md"))
    parser.add_argument("--skip-tests", action="store_true", help="do not run the test files (section 4)")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1" if not torch.cuda.is_available() else "0")
    summary: list = []
    with tempfile.TemporaryDirectory(prefix="dsclora_reliability_") as tmp:
        work = Path(tmp)
        sections = [inputs_section(work / "inputs", summary), checkpoints_section(work / "checkpoints", summary),
                    crash_section(work / "crash", args.seeds, summary)]
    if not args.skip_tests:
        sections.append(tests_section(summary))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    header = f"""# Reliability report

Generated by `python tests/reliability_report.py --seeds {args.seeds}` on {datetime.date.today()}; do not edit by
hand. Machine: {cpu}, {os.cpu_count()} cores (shared with other jobs while this ran), Python
{platform.python_version()}, torch {torch.__version__}, {"CUDA" if torch.cuda.is_available() else "no GPU"}.
Numbers come from the same scenario code the tests assert on.

{table(["scenario", "cases", "as expected"], summary)}
"""
    text = "\n".join([header, *sections]).replace(tmp, "$TMP")
    text = re.sub(r"x{20,}", lambda m: f"x…x ({len(m[0])} x)", text)  # the over-long file name
    Path(args.output).write_text(text)
    failed = [row[0] for row in summary if row[1] != row[2]]
    print(f"wrote {args.output}" + (f"; NOT as expected: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
