"""Environment and backend report (``dsclora info``)."""
import os
import platform

import torch

import dsclora
import dsclora_kernels
from dsclora_kernels import _dispatch, _extension, _native
from dsclora_kernels._log import FALLBACKS


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


def report() -> str:
    lines = [
        f"dsclora {dsclora.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}: {_dispatch.triton_status()}")
    except ImportError:
        lines.append("triton: not installed")
    lines.append(f"cpu threads: {torch.get_num_threads()}")
    requested = os.environ.get(_native.ISA_VARIABLE) or "unset, the best supported"
    lines.append(f"compiled CPU kernels ({_native.ISA_VARIABLE}: {requested}):")
    lines.extend(f"  _{name}: {_kernels_status(name)}" for name in dsclora_kernels.EXTENSIONS)
    if FALLBACKS:
        lines.append("slower paths taken in this process:")
        lines.extend(f"  {key}: {reason}" for key, reason in FALLBACKS.items())
    return "\n".join(lines)
