"""Fast ops of dsclora: plain-PyTorch references (the specification), Triton kernels for
the GPU, C++ kernels for the CPU (``csrc/``), all registered as ``torch.library`` custom ops
in the ``dsclora`` namespace. One package per op (``spab``, ``affinity``, ``metrics``), one
module per backend, chosen by the registry in ``_dispatch``."""
from . import diagnostics, metrics
from ._dispatch import use_backend
from ._log import fallback
from .affinity import spatial_affinity_loss
from .affinity.reference import spatial_affinity_loss_reference
from .spab import spab, spab_forward
from .spab.reference import spab_reference

#: Compiled CPU modules (``csrc/cpu/<name>.cpp`` -> ``dsclora_kernels._<name>``), named by the ops' backends.
EXTENSIONS = diagnostics.extensions()

__all__ = ["use_backend", "fallback", "EXTENSIONS", "spatial_affinity_loss", "spatial_affinity_loss_reference",
           "spab", "spab_forward", "spab_reference", "metrics", "diagnostics"]
