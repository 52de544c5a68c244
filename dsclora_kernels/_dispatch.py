"""Which implementation of a fast op runs: ``"cpp"``, ``"triton"`` or ``"reference"``.

By default CUDA tensors use Triton and CPU tensors the C++ extension (``csrc/<op>.cpp``).
``use_backend(name)`` forces one, e.g. Triton on CPU tensors under ``TRITON_INTERPRET=1``
(how CI tests the GPU kernels). Every fallback to a slower path is logged once.
"""
import contextlib
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
        return "available"
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
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
        if forced == "triton" and device.type == "cpu" and not triton_interpreting():
            raise RuntimeError(f"{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
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
