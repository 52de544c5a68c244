"""The one checked path from Python into the C++ kernels (``dsclora_kernels._<name>``, csrc/).

A tensor crosses as a TensorArg ``(address, dtype, shape, strides in elements)``
(csrc/common/tensor_view.h), made only by `tensor` after it checked that the memory is CPU memory
of the expected dtype and layout: a CUDA (or meta) tensor never reaches C++ as a pointer.
The TensorArg holds the tensor, so the memory lives as long as the argument does.
`call` runs a kernel on the instruction set `isa` picks: the best this CPU runs, or the one
named by the environment variable DSCLORA_CPU_ISA.
"""
import os
from typing import Optional, Union

import numpy as np
import torch

from . import _extension

ISA_VARIABLE = "DSCLORA_CPU_ISA"
#: Instruction sets of the C++ kernels, best first (csrc/common/cpu_features.h); "generic" runs everywhere.
ISAS = ("avx512", "avx2", "generic")
#: Layout requirements of `tensor`: any strides, C-contiguous, unit stride in the last dimension.
LAYOUTS = ("strided", "contiguous", "rows")


class TensorArg(tuple):
    """``(address, dtype, shape, strides)``, the tuple C++ reads, holding its tensor alive."""

    def __new__(cls, t, address: int, dtype: str, shape: tuple[int, ...], strides: tuple[int, ...]):
        arg = super().__new__(cls, (address, dtype, shape, strides))
        arg.tensor = t
        return arg


def tensor(t: Union[torch.Tensor, np.ndarray, None], what: str, dtype: torch.dtype,
           layout: str = "strided") -> Optional[TensorArg]:
    """``t`` (a torch tensor or numpy array) as a TensorArg once it is checked to be CPU memory of
    ``dtype`` with ``layout`` (one of LAYOUTS); None stays None (an absent optional tensor).
    ``what`` names the tensor in errors, e.g. ``"spab: x"``."""
    if t is None:
        return None
    expected = str(dtype).removeprefix("torch.")
    if isinstance(t, torch.Tensor):
        if t.device.type != "cpu":
            raise ValueError(f"{what} is on {t.device}; the C++ kernels take CPU tensors only")
        if t.layout != torch.strided:
            raise ValueError(f"{what} has layout {t.layout}; the C++ kernels take dense (strided) tensors")
        got, strides = str(t.dtype).removeprefix("torch."), tuple(t.stride())
        contiguous = t.is_contiguous()
    elif isinstance(t, np.ndarray):
        got, itemsize = t.dtype.name, t.dtype.itemsize
        if any(s % itemsize for s in t.strides):
            raise ValueError(f"{what} has strides {t.strides} bytes, not whole {itemsize}-byte elements")
        strides, contiguous = tuple(s // itemsize for s in t.strides), t.flags.c_contiguous
    else:
        raise TypeError(f"{what} must be a torch.Tensor or a numpy array, got {type(t).__name__}")
    if got != expected:
        raise ValueError(f"{what} must be {expected}, got {got}")
    if layout not in LAYOUTS:
        raise ValueError(f"{what}: unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "contiguous" and not contiguous:
        raise ValueError(f"{what} must be contiguous, got strides {strides}")
    if layout == "rows" and t.ndim and t.shape[-1] > 1 and strides[-1] != 1:
        raise ValueError(f"{what} must have unit stride in its last dimension, got strides {strides}")
    address = t.data_ptr() if isinstance(t, torch.Tensor) else t.ctypes.data
    return TensorArg(t, address, expected, tuple(t.shape), strides)


def supported_isas(extension: str) -> list[str]:
    """The instruction sets ``_<extension>`` runs on this CPU, best first (empty if not built)."""
    module = _extension.load(extension)
    return [] if module is None else list(module.supported_isas())


def isa(extension: str) -> str:
    """The instruction set for the kernels of ``_<extension>``: $DSCLORA_CPU_ISA when set (it must
    be one this CPU runs), else the best supported one."""
    supported = supported_isas(extension)
    if not supported:
        raise RuntimeError(f"{extension}: {_extension.status(extension)}")
    requested = os.environ.get(ISA_VARIABLE, "").strip()
    if requested in ("", "auto"):
        return supported[0]
    if requested not in supported:
        why = "this CPU does not run it" if requested in ISAS else "unknown instruction set"
        raise RuntimeError(f"{ISA_VARIABLE}={requested!r}: {why}; supported here: {', '.join(supported)} "
                           "(or 'auto', the best)")
    return requested


def call(extension: str, function: str, *args, **kwargs):
    """``dsclora_kernels._<extension>.<function>(*args, **kwargs)`` on the instruction set `isa`
    picks (unless ``isa=`` is given, e.g. the one weights were packed for). Tensors go only as
    TensorArgs made by `tensor`."""
    module = _extension.load(extension)
    if module is None:
        raise RuntimeError(f"{extension}: {_extension.status(extension)}")
    kwargs.setdefault("isa", isa(extension))
    return getattr(module, function)(*args, **kwargs)
