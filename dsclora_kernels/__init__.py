"""Fast ops of dsclora: plain-PyTorch references (the specification), Triton kernels for
the GPU, C++ kernels for the CPU (``csrc/``), all registered as ``torch.library`` custom ops
in the ``dsclora`` namespace."""
from ._dispatch import use_backend

#: Compiled CPU modules (``csrc/<name>.cpp`` -> ``dsclora_kernels._<name>``).
EXTENSIONS = ("metrics",)

__all__ = ["use_backend", "EXTENSIONS"]
