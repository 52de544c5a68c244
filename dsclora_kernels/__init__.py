"""Fast ops of dsclora: plain-PyTorch references (the specification), Triton kernels for
the GPU, C++ kernels for the CPU (``csrc/``), all registered as ``torch.library`` custom ops
in the ``dsclora`` namespace."""
from ._dispatch import use_backend
from .affinity import spatial_affinity_loss
from .affinity_pairs import spatial_affinity_loss_pairs
from .affinity_reference import spatial_affinity_loss_reference
from .spab import spab
from .spab_reference import spab_reference

#: Compiled CPU modules (``csrc/<name>.cpp`` -> ``dsclora_kernels._<name>``).
EXTENSIONS = ("metrics", "affinity", "spab")

__all__ = ["use_backend", "EXTENSIONS", "spatial_affinity_loss", "spatial_affinity_loss_pairs",
           "spatial_affinity_loss_reference",
           "spab", "spab_reference"]
