"""Shared memory, registers and spills of every Triton launch of the fused ops, per GPU architecture,
compiled ahead of time (no GPU needed): ``python bench/triton_budget.py [--jobs N]``.

Prints the machine, date, Triton version and commit, then ``dsclora_kernels.triton_budget``'s
table; exits 1 if a launch is over its budget. ``--device cuda`` (on a GPU) instead launches
each kernel of the device's architecture and prints what the driver reports after the launch.
"""
import datetime
import os
import platform
import subprocess
import sys

import torch
import triton

from dsclora_kernels import triton_budget


def header() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    return (f"### triton_budget: {cpu}, {os.cpu_count()} cores, {datetime.date.today()}, triton {triton.__version__}, "
            f"torch {torch.__version__}, commit {commit}")


if __name__ == "__main__":
    print(header(), flush=True)
    sys.exit(triton_budget.main(sys.argv[1:]))
