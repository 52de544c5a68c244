"""What every Triton backend shares: whether Triton can run here, the channel padding of its
kernels, and the ahead-of-time interface ``triton_budget`` compiles them through. Importing this
module does not import triton.

Every Triton backend module offers, for ``triton_budget``:
  ``aot_cases(arch) -> list[AotCase]``: every launch it makes on GPUs of budget ``arch``;
  ``aot_launch(arch, *case.build) -> AotLaunch``: one of them, built on CPU tensors.
"""
import functools
import importlib.util
import os
from typing import Any, NamedTuple, Optional

import torch


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_status() -> str:
    """'available' or why Triton cannot run here."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if triton_interpreting():
        return interpreter_status()
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
    return "available"


@functools.lru_cache(maxsize=None)
def interpreter_status() -> str:
    """'available', or why Triton's interpreter cannot run our kernels: it runs a kernel with a
    runtime loop bound (what they all have), which e.g. Triton 3.6's interpreter cannot do
    under NumPy >= 2.4."""
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def count_up(out_ptr, n):
        for i in range(0, n):
            tl.store(out_ptr + i, i)

    out = torch.zeros(2, dtype=torch.int32)
    try:
        count_up[(1,)](out, 2)
    except Exception as error:  # noqa: BLE001 - any failure means the interpreter is unusable
        return (f"the Triton {triton.__version__} interpreter fails with NumPy {numpy.__version__} "
                f"({type(error).__name__}: {error}); Triton 3.6 fails so under NumPy >= 2.4: pip install 'numpy<2.4'")
    if out.tolist() != [0, 1]:
        return f"the Triton {triton.__version__} interpreter computed {out.tolist()} for [0, 1]"
    return "available"


def status(device: torch.device) -> str:
    """'available' or why a Triton kernel cannot take tensors on ``device`` (CUDA; the CPU only
    in the interpreter)."""
    if device.type == "cpu" and not triton_interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return f"the tensors are on {device}; Triton kernels take CUDA tensors"
    return triton_status()


def padded_channels(c: int) -> int:
    """c rounded up to a power of two, at least 16 (the smallest ``tl.dot`` size)."""
    return max(16, 1 << (c - 1).bit_length())


class AotCase(NamedTuple):
    """One launch of a Triton backend on one GPU architecture, and the budget it must meet."""

    kernel: str  # the op: "spab", "affinity"
    dtype: str
    channels: str
    mode: str
    config: str
    arch: str
    build: tuple  # the backend's ``aot_launch`` arguments after the architecture
    spills_tolerated: Optional[int]  # register spill bytes allowed (None: any, e.g. fp32 CUDA-core code)
    needs_tensor_cores: bool  # its SASS must hold HMMA / HGMMA instructions


class AotLaunch(NamedTuple):
    """A launch as ``kernel[grid](*args, **kwargs)`` would make it."""

    kernel: Any  # the @triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict
    programs_per_sm: Optional[int]  # persistent kernels: how many the launcher starts per SM
