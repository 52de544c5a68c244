"""What ``dsclora info`` shows about the fast ops: Triton, the compiled CPU kernels and their
instruction sets, each op's backends per device in order, and the slower paths taken so far."""
import os

from . import _dispatch, _extension, _native, triton_support
from ._log import FALLBACKS


def extensions() -> tuple[str, ...]:
    """The compiled CPU modules the ops use (``csrc/cpu/<name>.cpp`` -> ``dsclora_kernels._<name>``),
    as their registered "cpp" backends name them."""
    names = {backend.EXTENSION for registry in _dispatch.REGISTRIES
             for backends in registry.by_device.values() for backend in backends if backend.NAME == "cpp"}
    return tuple(sorted(names))


def _kernels_status(extension: str) -> str:
    """'available, instruction sets ..., running ...' or why the compiled module cannot be used."""
    status = _extension.status(extension)
    if status != "available":
        return status
    try:
        chosen = _native.isa(extension)
    except RuntimeError as exc:
        chosen = f"none ({exc})"
    return f"available, instruction sets {', '.join(_native.supported_isas(extension))}; running {chosen}"


def report_lines() -> list[str]:
    lines = []
    try:
        import triton

        lines.append(f"triton {triton.__version__}: {triton_support.triton_status()}")
    except ImportError:
        lines.append("triton: not installed")
    requested = os.environ.get(_native.ISA_VARIABLE) or "unset, the best supported"
    lines.append(f"compiled CPU kernels ({_native.ISA_VARIABLE}: {requested}):")
    lines.extend(f"  _{name}: {_kernels_status(name)}" for name in extensions())
    lines.append("backends, in the order tried:")
    lines.extend(f"  {line}" for registry in _dispatch.REGISTRIES for line in registry.describe())
    if FALLBACKS:
        lines.append("slower paths taken in this process:")
        lines.extend(f"  {key}: {reason}" for key, reason in FALLBACKS.items())
    return lines
