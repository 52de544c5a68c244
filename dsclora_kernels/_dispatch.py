"""Which implementation of a fast op runs: ``"cpp"``, ``"triton"`` or ``"reference"``.

By default CUDA tensors use Triton and CPU tensors the C++ extension (``csrc/<op>.cpp``).
``use_backend(name)`` forces one, e.g. Triton on CPU tensors under ``TRITON_INTERPRET=1``
(how CI tests the GPU kernels). Every fallback to a slower path is logged once.
"""
import contextlib
import functools
import importlib.util
import os

import torch

from . import _extension
from ._log import fallback

BACKENDS = ("cpp", "triton", "reference")
_forced: list[str] = []


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_status() -> str:
    """'available' or why Triton cannot run here."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if triton_interpreting():
        return _interpreter_status()
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
    return "available"


@functools.lru_cache(maxsize=None)
def _interpreter_status() -> str:
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


@contextlib.contextmanager
def use_backend(name: str):
    """Force every op inside the block onto backend ``name`` (one of BACKENDS)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def choose(op: str, extension: str, device: torch.device) -> str:
    """The backend for ``op`` on ``device``; ``extension`` names its compiled CPU module."""
    if _forced:
        forced = _forced[-1]
        if forced == "cpp" and _extension.load(extension) is None:
            raise RuntimeError(f"{op}: backend 'cpp' forced but {_extension.status(extension)}")
        if forced == "cpp" and device.type != "cpu":
            raise RuntimeError(f"{op}: backend 'cpp' forced but the tensors are on {device}; the C++ kernels "
                               "take CPU tensors only (use backend 'triton' or move them with .cpu())")
        if forced == "triton" and device.type == "cpu":
            if not triton_interpreting():
                raise RuntimeError(f"{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
            if triton_status() != "available":
                raise RuntimeError(f"{op}: backend 'triton' forced but {triton_status()}")
        return forced
    if device.type == "cuda":
        status = triton_status()
        if status == "available":
            return "triton"
        fallback(f"{op}:cuda", status)
        return "reference"
    if device.type == "cpu":
        if _extension.load(extension) is not None:
            return "cpp"
        fallback(f"{op}:cpu", _extension.status(extension))
        return "reference"
    fallback(f"{op}:{device.type}", f"no fused kernel for device type {device.type!r}")
    return "reference"
