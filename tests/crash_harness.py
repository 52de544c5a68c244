"""Kill training runs at chosen moments and check what they leave behind.

A run is a forked child of the test process (torch is already imported: no start-up cost) that
trains a tiny DSCLoRA setup (SPAN C=8 student, C=10 teacher, x2, 16/24-pixel patches) on one
thread with deterministic algorithms. The child reports events through a pipe:

* ``step K``: optimisation step K (0-based) begins;
* ``written NAME`` / ``replaced NAME``: a file's temporary copy is written (not yet renamed) /
  renamed into place by ``checkpoint.atomic_write`` (`` for K`` added while saving checkpoint
  ``last`` of iteration K);
* ``half-written NAME``: reported instead of ``written NAME`` only when the child pauses on it:
  the temporary copy holds half of its bytes, as if the kill came in the middle of the write;
* ``saved K``: checkpoint ``last`` of iteration K is complete (its files are copied into
  ``snapshot_dir`` as ``K.safetensors`` and ``K.json`` when one is given);
* ``stderr LINE`` and ``exit CODE``: what the command printed and returned, once it returned.

``run(..., pause_on=EVENT)`` makes the child stop right after reporting EVENT, so that the parent's
SIGKILL lands exactly there; ``kill_after=(EVENT, seconds)`` signals at a time after an event
instead, wherever the child then is (SIGKILL, or ``signum``). Used by tests/test_reliability_training.py and
tests/reliability_report.py.
"""
import json
import multiprocessing
import os
import select
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ITERATIONS = (8, 6)  # iterations of the two stages
PAUSE_SECONDS = 120.0


def make_setup(root: Path) -> Path:
    """Sample images, base and teacher checkpoints and ``config.toml`` under ``root``."""
    from dsclora.data import save_image
    from dsclora.models import SPAN
    from dsclora.sample_data import write_sample_images

    root = Path(root)
    write_sample_images(root / "train", 4, seed=0, height=40, width=48)
    save_image(root / "train" / "zz_small.png", np.zeros((12, 12, 3), np.float32))  # skipped: < patch
    torch.manual_seed(1)
    torch.save(SPAN(8, upscale=2, form="eval").state_dict(), root / "base.pth")
    torch.save(SPAN(10, upscale=2, form="train").state_dict(), root / "teacher.pth")
    ranks = "block_1 = 2, block_2 = 2, block_3 = 2, block_4 = 2, block_5 = 2, block_6 = 2, conv_2 = 3"
    stages = "".join(f"[[stages]]\niterations = {n}\npatch_size = {p}\nbatch_size = 2\nlr = 1e-3\n"
                     for n, p in zip(ITERATIONS, (16, 24)))
    config = root / "config.toml"
    config.write_text(f"""progress = false
deterministic = true
device = "cpu"
log_every = 1
checkpoint_every = 1
[model]
base = "{root / 'base.pth'}"
teacher = "{root / 'teacher.pth'}"
ranks = {{ {ranks}, "upsampler.0" = 2 }}
[data]
hr = ["{root / 'train'}"]
workers = 0
{stages}""")
    return config


@dataclass
class Run:
    """What a child did: its events, how it ended, and its output."""

    events: list[str]
    times: list[float]  # when each event arrived, in seconds from the start
    exitcode: int | None
    killed: bool
    seconds: float

    def step_seconds(self) -> float:
        """The median time between two steps (a step and its checkpoint)."""
        starts = [t for e, t in zip(self.events, self.times) if e.startswith("step ")]
        return float(np.median(np.diff(starts))) if len(starts) > 1 else 0.05

    @property
    def code(self) -> int | None:
        """The command's return code (None if it did not return)."""
        return next((int(e.split()[1]) for e in self.events if e.startswith("exit ")), None)

    @property
    def stderr(self) -> str:
        return "\n".join(e.removeprefix("stderr ") for e in self.events if e.startswith("stderr "))


def _child(config: Path, run_dir: Path, resume: bool, out_fd: int, pause_on: str | None,
           disk_full_on: str | None, snapshot_dir: Path | None) -> None:
    """Body of a forked training process: ``dsclora train`` with the events of the module docstring."""
    import contextlib
    import errno
    import io

    from dsclora.cli import main
    from dsclora.train import checkpoint
    from dsclora.train.trainer import Trainer

    torch.set_num_threads(1)

    def emit(event: str) -> None:
        os.write(out_fd, (event + "\n").encode())
        if event == pause_on:
            time.sleep(PAUSE_SECONDS)  # the parent kills us here

    atomic_write, save, step = checkpoint.atomic_write, checkpoint.save, Trainer.step
    saving = []  # the iteration of the checkpoint ``last`` being saved

    def reporting_atomic_write(path, write):
        name = Path(path).name + (f" for {saving[0]}" if saving else "")

        def write_then_report(tmp):
            write(tmp)
            if pause_on == f"half-written {name}":  # the kill lands inside the write
                with open(tmp, "r+b") as f:
                    f.truncate(os.path.getsize(tmp) // 2)
                emit(pause_on)
            if name == disk_full_on:  # the disk filled up half-way through this file
                with open(tmp, "r+b") as f:
                    f.truncate(os.path.getsize(tmp) // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
            emit(f"written {name}")
        atomic_write(path, write_then_report)
        emit(f"replaced {name}")

    def reporting_save(folder, name, tensors, state):
        if name != "last":
            return save(folder, name, tensors, state)
        saving.append(state["iteration"])
        try:
            json_path = save(folder, name, tensors, state)
        finally:
            saving.clear()
        if snapshot_dir is not None:
            shutil.copy(json_path, snapshot_dir / f"{state['iteration']}.json")
            shutil.copy(folder / json.loads(json_path.read_text())["tensors"],
                        snapshot_dir / f"{state['iteration']}.safetensors")
        emit(f"saved {state['iteration']}")
        return json_path

    def reporting_step(self, lr, hr, **kwargs):
        emit(f"step {self.iteration}")
        return step(self, lr, hr, **kwargs)

    checkpoint.atomic_write, checkpoint.save, Trainer.step = reporting_atomic_write, reporting_save, reporting_step
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", "--config", str(config), f"run_dir={run_dir}", *(["--resume"] if resume else [])])
    for line in stderr.getvalue().splitlines():
        emit(f"stderr {line}")
    emit(f"exit {code}")


def run(config: Path, run_dir: Path, resume: bool = False, pause_on: str | None = None,
        kill_after: tuple[str, float] | None = None, signum: int = signal.SIGKILL,
        disk_full_on: str | None = None, snapshot_dir: Path | None = None, timeout: float = 60.0) -> Run:
    """Run ``dsclora train [--resume]`` in a forked child; SIGKILL it when ``pause_on`` is reached,
    or send it ``signum`` ``kill_after[1]`` seconds after event ``kill_after[0]``. Without either
    it trains to the end. ``disk_full_on`` (a ``written`` event's name): that file's write fails
    half-way with ENOSPC."""
    context = multiprocessing.get_context("fork")
    read_fd, write_fd = os.pipe()
    start = time.monotonic()
    child = context.Process(target=_child, daemon=True,
                            args=(config, run_dir, resume, write_fd, pause_on, disk_full_on, snapshot_dir))
    child.start()
    os.close(write_fd)
    trigger, delay = (pause_on, 0.0) if pause_on else (kill_after or (None, 0.0))
    events, times, pending, killed = [], [], b"", False
    try:
        while True:
            left = timeout - (time.monotonic() - start)
            if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                child.kill()
                raise TimeoutError(f"training child still running after {timeout} s; events: {events[-5:]}")
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                events.append(line.decode())
                times.append(time.monotonic() - start)
                if not killed and events[-1] == trigger:
                    time.sleep(delay)
                    os.kill(child.pid, signum)
                    killed = True
    finally:
        os.close(read_fd)
        child.join(timeout)
    return Run(events, times, child.exitcode, killed, time.monotonic() - start)


# ---------------------------------------------------------------- the crash scenario
#: Kills that land inside checkpoint writing: the event the child pauses on, for checkpoint K.
PAUSE_EVENTS = {
    "tensor file half-written": "half-written last-{k:09d}.safetensors for {k}",
    "tensor file written, not renamed": "written last-{k:09d}.safetensors for {k}",
    "tensor file renamed, JSON not written": "replaced last-{k:09d}.safetensors for {k}",
    "JSON written, not renamed": "written last.json for {k}",
    "JSON renamed, old tensor file not deleted": "replaced last.json for {k}",
}
RANDOM_KILL = "at a random time after step {k} began"


@dataclass
class Kill:
    """One SIGKILL and what it left: the checkpoint ``last`` must be the last one completed."""

    kind: str
    target: int           # the step or checkpoint the kill aimed at
    last_event: str       # the child's last report before it died
    completed: int        # the last checkpoint whose JSON was renamed before the kill (0: none)
    found: int            # the iteration of checkpoint ``last`` after the kill (0: none)
    allowed: tuple[int, ...]  # ``found`` values consistent with the events (see kill_and_resume)
    identical: bool       # its tensors and JSON equal the uninterrupted run's checkpoint ``found``
    leftovers: list[str]  # files beside the checkpoint (the next save removes them)
    resumed_at: int | None = None  # the first step of the next run


def checkpoint_files(run_dir: Path) -> list[str]:
    folder = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def matches_snapshot(run_dir: Path, snapshots: Path) -> tuple[int, bool]:
    """(iteration of checkpoint ``last`` or 0, whether it equals the uninterrupted run's)."""
    from safetensors.torch import load_file

    from dsclora.train import checkpoint

    saved = checkpoint.load(Path(run_dir) / "checkpoints", "last")
    if saved is None:
        return 0, True
    tensors, state = saved
    k = state["iteration"]
    expected = load_file(str(snapshots / f"{k}.safetensors"))
    same = tensors.keys() == expected.keys() and all(torch.equal(tensors[n], expected[n]) for n in tensors)
    return k, same and state == json.loads((snapshots / f"{k}.json").read_text())


def kill_and_resume(config: Path, run_dir: Path, snapshots: Path, seed: int, step_seconds: float,
                    kills: int = 7):
    """SIGKILL a run ``kills`` times at seeded random points (each kind of PAUSE_EVENTS once, the
    rest RANDOM_KILL, up to ``step_seconds`` after a step began), resuming after each; then let
    it finish. Each target is drawn after the previous kill, at most two iterations ahead of the
    checkpoint it left, so that every kill lands before the run's end. Returns (kills, final run)."""
    import random

    rng = random.Random(seed)
    total = sum(ITERATIONS)
    kinds = list(PAUSE_EVENTS) + [RANDOM_KILL] * (kills - len(PAUSE_EVENTS))
    rng.shuffle(kinds)
    records, completed = [], 0
    for index, kind in enumerate(kinds):
        if kind == RANDOM_KILL:  # within step k or the save after it, two steps before the end at most
            k = rng.randint(completed, max(completed, min(completed + 1, total - 2)))
            result = run(config, run_dir, resume=index > 0, kill_after=(f"step {k}", rng.uniform(0, step_seconds)))
        else:
            k = rng.randint(completed + 1, completed + 2)
            result = run(config, run_dir, resume=index > 0, pause_on=PAUSE_EVENTS[kind].format(k=k))
        if not result.killed or result.exitcode != -signal.SIGKILL:
            raise AssertionError(f"the run was not killed ({kind.format(k=k)}): {result.events[-3:]}")
        if records:
            records[-1].resumed_at = first_step(result)
        completed = max([completed] + [int(e.split()[-1]) for e in result.events if e.startswith("replaced last.json")])
        # a kill between a JSON's rename and its report leaves the next checkpoint, complete
        next_written = f"written last.json for {completed + 1}" in result.events
        allowed = (completed, completed + 1) if next_written else (completed,)
        found, identical = matches_snapshot(run_dir, snapshots)
        current = {"last.json", f"last-{found:09d}.safetensors"}
        records.append(Kill(kind.format(k=k), k, result.events[-1] if result.events else "", completed, found,
                            allowed, identical, [f for f in checkpoint_files(run_dir) if f not in current]))
        completed = found
    final = run(config, run_dir, resume=True)
    records[-1].resumed_at = first_step(final)
    return records, final


def first_step(result: Run) -> int | None:
    return next((int(e.split()[1]) for e in result.events if e.startswith("step ")), None)


def differing_outputs(run_dir: Path, reference_dir: Path) -> list[str]:
    """What differs between two finished runs: exported weights (every tensor) and the training
    log (every column but the speed). Empty when the runs ended identical."""
    import csv

    from dsclora.models import read_state_dict

    differences = []
    for name in ("dsclora_x2.safetensors", "dsclora_x2.pth"):
        ours, theirs = read_state_dict(Path(run_dir) / name)[0], read_state_dict(Path(reference_dir) / name)[0]
        if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
            differences.append(name)

    def log(folder):
        with open(Path(folder) / "train_log.csv", newline="") as f:
            return [{k: v for k, v in row.items() if k != "it_per_s"} for row in csv.DictReader(f)]

    if log(run_dir) != log(reference_dir):
        differences.append("train_log.csv")
    return differences


def ctrl_c(config: Path, run_dir: Path, after_rows: int = 1, *overrides: str) -> tuple[int, str]:
    """Start a real ``dsclora train`` process (one DataLoader worker) and, once its log holds
    ``after_rows`` iterations, send SIGINT to its whole process group, as Ctrl+C in a terminal
    does. Returns (exit code, stderr)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "dsclora", "train", "--config", str(config), f"run_dir={run_dir}",
               "data.workers=1", *overrides]
    # cwd outside the source tree: `-m dsclora` must import the installed package (compiled kernels).
    process = subprocess.Popen(command, cwd=Path(run_dir).parent, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log, deadline = Path(run_dir) / "train_log.csv", time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) > after_rows:  # a header, then one row each
            os.killpg(process.pid, signal.SIGINT)
            break
        time.sleep(0.005)
    _, err = process.communicate(timeout=120)
    return process.returncode, err
