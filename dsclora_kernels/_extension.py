"""Lazy import of the compiled CPU kernels (``dsclora_kernels._<name>``, built from csrc/cpu/<name>.cpp).

The build (setup.py) never fails the install over an extension: it writes each extension's
outcome to ``_build_report.json`` next to the modules, and a module that is missing says why.
"""
import importlib
import json
from pathlib import Path
from types import ModuleType

from ._log import fallback

#: {name: "built" or why the build failed}, written by setup.py's build_ext.
BUILD_REPORT = Path(__file__).with_name("_build_report.json")

_MODULES: dict[str, ModuleType | None] = {}
_REASONS: dict[str, str] = {}


def _build_outcomes() -> dict[str, str] | None:
    try:
        return json.loads(BUILD_REPORT.read_text())
    except (OSError, ValueError):
        return None


def _why_missing(name: str, error: ImportError) -> str:
    """Why ``_<name>`` cannot be imported: the install's build report, else the import error."""
    module = f"dsclora_kernels._{name}"
    outcomes = _build_outcomes()
    if outcomes is not None and outcomes.get(name, "built") != "built":
        return f"{module} was not built: {outcomes[name]}"
    if outcomes is not None and name not in outcomes:
        return (f"{module} was not part of this install's build (built: {', '.join(sorted(outcomes)) or 'none'}; "
                "DSCLORA_EXTENSIONS limits it); reinstall with `pip install .`")
    return f"{module} is not importable ({error}); reinstall with `pip install .` and a C++17 compiler"


def load(name: str) -> ModuleType | None:
    """The compiled module ``_<name>``, or None (the reason is logged once and kept)."""
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(f"dsclora_kernels._{name}")
        except ImportError as exc:
            _MODULES[name] = None
            _REASONS[name] = _why_missing(name, exc)
            fallback(f"extension:{name}", _REASONS[name])
    return _MODULES[name]


def status(name: str) -> str:
    """'available' or the reason the compiled module ``_<name>`` cannot be used."""
    return "available" if load(name) is not None else _REASONS[name]


def cpu_status(name: str, device) -> str:
    """'available' or why the kernels of ``_<name>`` cannot take tensors on ``device``."""
    if device.type != "cpu":
        return (f"the tensors are on {device}; the C++ kernels take CPU tensors only "
                "(use backend 'triton' or move them with .cpu())")
    return status(name)
