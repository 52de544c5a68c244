"""The backend registry: which implementation of a fast op runs.

Each op package (``spab``, ``affinity``, ``metrics``) makes one `Registry`: an ordered list of
backends per device type, fastest first, its reference last (and alone on any other device).
A backend is a module of that package with

* ``NAME``: ``"cpp"``, ``"triton"``, ``"reference"`` (what ``use_backend`` names);
* ``status(device) -> str``: ``"available"`` or why it cannot run on ``device`` here (for a
  `LazyBackend`, given with its entry);
* ``unsupported(*args) -> (key, reason) | None``: why it cannot take these arguments;
* the op's entry points (the same names in every backend of one op).

`Registry.choose` takes the first backend that is available and supports the arguments, and
logs once why each one before it was skipped (``dsclora info`` shows it). Adding a backend is
one module and one list entry; a backend whose import is costly (Triton's, ~0.3 s) is listed as a
`LazyBackend`, imported when first chosen. ``use_backend(name)`` forces one, e.g. Triton on CPU tensors
under ``TRITON_INTERPRET=1`` (how CI tests the GPU kernels): it raises if that backend cannot
run here, and falls back (logged) to the reference for arguments it does not support.
"""
import contextlib
import importlib
from types import ModuleType
from typing import Callable, Sequence

import torch

from ._log import fallback

BACKENDS = ("cpp", "triton", "reference")
_forced: list[str] = []
#: Every op's registry, in creation order (``dsclora info`` lists them).
REGISTRIES: list["Registry"] = []


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


class LazyBackend:
    """Backend module ``module`` imported on first use: ``NAME`` and ``status`` (the module's
    own, given here) answer without importing it; any other attribute imports it."""

    def __init__(self, module: str, name: str, status: Callable[[torch.device], str]):
        self._module, self.NAME, self.status = module, name, status

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self._module), attribute)


#: A backend: its module, or a LazyBackend standing for it.
Backend = ModuleType | LazyBackend


class Registry:
    """The backends of op ``op`` per device type (``by_device``: fastest first, without the
    reference, which every list ends with)."""

    def __init__(self, op: str, reference: ModuleType, **by_device: Sequence[Backend]):
        self.op, self.reference = op, reference
        self.by_device = {device: (*backends, reference) for device, backends in by_device.items()}
        REGISTRIES.append(self)

    def candidates(self, device: torch.device) -> tuple[Backend, ...]:
        return self.by_device.get(device.type, (self.reference,))

    def choose(self, device: torch.device, *args) -> Backend:
        """The backend that runs the op on ``args`` (tensors on ``device``)."""
        if _forced:
            return self._forced(_forced[-1], device, args)
        if device.type not in self.by_device:
            fallback(f"{self.op}:{device.type}", f"no fused kernel for device type {device.type!r}")
        for backend in self.candidates(device):
            status = backend.status(device)
            if status != "available":
                fallback(f"{self.op}:{backend.NAME}", status)
                continue
            unsupported = backend.unsupported(*args)
            if unsupported is None:
                return backend
            key, reason = unsupported
            fallback(f"{self.op}:{backend.NAME}:{key}", reason)
        raise AssertionError(f"{self.op}: the reference backend refused {device}")  # it never does

    def _forced(self, name: str, device: torch.device, args: tuple) -> Backend:
        backend = next((b for backends in self.by_device.values() for b in backends if b.NAME == name), None)
        if backend is None:
            fallback(f"{self.op}:{name}", f"{self.op} has no {name} backend; using the reference")
            return self.reference
        status = backend.status(device)
        if status != "available":
            raise RuntimeError(f"{self.op}: backend {name!r} forced but {status}")
        unsupported = backend.unsupported(*args)
        if unsupported is None:
            return backend
        key, reason = unsupported
        fallback(f"{self.op}:{name}:{key}", reason)
        return self.reference

    def describe(self) -> list[str]:
        """One line per device type: its backends in order, each with its status here."""
        lines = []
        for device, backends in self.by_device.items():
            states = [f"{b.NAME} ({b.status(torch.device(device))})" for b in backends]
            lines.append(f"{self.op} on {device}: {' > '.join(states)}")
        return lines
