"""Lazy import of the compiled CPU kernels (``dsclora_kernels._<name>``, built from csrc/)."""
import importlib
from types import ModuleType

from ._log import fallback

_MODULES: dict[str, ModuleType | None] = {}
_REASONS: dict[str, str] = {}


def load(name: str) -> ModuleType | None:
    """The compiled module ``_<name>``, or None (the reason is logged once and kept)."""
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(f"dsclora_kernels._{name}")
        except ImportError as exc:
            _MODULES[name] = None
            _REASONS[name] = (
                f"compiled extension dsclora_kernels._{name} is not importable ({exc}); "
                "reinstall with `pip install .` and a C++17 compiler"
            )
            fallback(f"extension:{name}", _REASONS[name])
    return _MODULES[name]


def status(name: str) -> str:
    """'available' or the reason the compiled module ``_<name>`` cannot be used."""
    return "available" if load(name) is not None else _REASONS[name]
