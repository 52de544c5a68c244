"""bench/gpu_perf.py (the one-run GPU benchmark) works before a GPU session spends time on it:
its sections run on CPU tensors in --smoke mode, a section that hangs is reported and the run goes on."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_perf.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_perf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sections_cover_both_issues_and_parse():
    gpu_perf = load()
    assert list(gpu_perf.SECTIONS) == ["spab_forward", "spab_train", "network", "affinity", "train_step"]
    args = gpu_perf.parse_args([])
    assert args.sections == list(gpu_perf.SECTIONS) and not args.smoke and args.backend == "default"
    with pytest.raises(SystemExit):
        gpu_perf.parse_args(["--sections", "nonsense"])


def run(*argv, timeout=240):
    root = str(SCRIPT.parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_smoke_section_writes_a_markdown_table(tmp_path):
    out = tmp_path / "results.md"
    done = run("--smoke", "--sections", "spab_forward", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    text = out.read_text()
    assert text.startswith("### bench/gpu_perf.py on CPU") and "commit" in text and "torch " in text
    row = next(line for line in text.splitlines() if line.startswith("| 1x26x12x12 | fp32"))
    errors = [float(v) for v in row.strip("| ").split(" | ")[-2:]]
    assert all(e < 1e-4 for e in errors), row  # fused and eager fp32 against float64


def test_a_hanging_section_is_reported_and_the_run_goes_on(tmp_path):
    done = run("--smoke", "--sections", "train_step", "affinity", "--timeout", "1")
    assert done.returncode == 1
    assert "**train_step: TIMEOUT after 1 s**" in done.stdout and "**affinity: TIMEOUT after 1 s**" in done.stdout
