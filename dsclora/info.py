"""Environment and backend report (``dsclora info``)."""
import platform

import torch

import dsclora
from dsclora.infer import precision
from dsclora_kernels import diagnostics


def report() -> str:
    lines = [
        f"dsclora {dsclora.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}",
    ]
    lines.append(f"cpu threads: {torch.get_num_threads()}; {precision.describe()} "
                 f"(the fused CPU kernels are float32; --bf16/--fp16 on the CPU run PyTorch's layers)")
    lines.extend(diagnostics.report_lines())
    return "\n".join(lines)
