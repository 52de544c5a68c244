"""Environment and backend report (``dsclora info``)."""
import platform

import torch

import dsclora
import dsclora_kernels
from dsclora_kernels import _dispatch, _extension
from dsclora_kernels._log import FALLBACKS


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
    lines.append("compiled CPU kernels:")
    for name in dsclora_kernels.EXTENSIONS:
        lines.append(f"  _{name}: {_extension.status(name)}")
    if FALLBACKS:
        lines.append("slower paths taken in this process:")
        lines.extend(f"  {key}: {reason}" for key, reason in FALLBACKS.items())
    return "\n".join(lines)
