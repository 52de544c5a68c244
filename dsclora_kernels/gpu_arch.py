"""Per-architecture resource budgets of NVIDIA GPUs, for choosing Triton launch configurations.

Numbers from the CUDA C++ Programming Guide, "Technical Specifications per Compute Capability":
shared memory per SM 164 KiB (8.0), 100 KiB (8.6, 8.9), 228 KiB (9.0); the most one block may
opt in to is 1 KiB less (the runtime reserves 1 KiB per block); 64 Ki 32-bit registers per SM,
at most 255 per thread, allocated per warp in units of 256.
"""
import functools
from typing import NamedTuple

import torch

REGS_PER_SM, MAX_REGS_PER_THREAD, REG_UNIT = 65_536, 255, 256
RESERVED_SMEM_PER_BLOCK = 1024


class Arch(NamedTuple):
    name: str
    capability: int  # 10 * major + minor
    smem_per_block: int  # bytes, the opt-in maximum of one block
    smem_per_sm: int  # bytes

    def blocks_per_sm(self, shared: int, regs: int, num_warps: int) -> int:
        """How many blocks using ``shared`` bytes and ``regs`` registers per thread fit on one SM."""
        by_smem = self.smem_per_sm // (shared + RESERVED_SMEM_PER_BLOCK)
        regs_per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
        return min(by_smem, REGS_PER_SM // (regs_per_warp * num_warps))


ARCHS = (
    Arch("sm_80", 80, 166_912, 167_936),  # A100
    Arch("sm_86", 86, 101_376, 102_400),  # RTX 30xx, A10, A40
    Arch("sm_89", 89, 101_376, 102_400),  # RTX 40xx, L4, L40
    Arch("sm_90", 90, 232_448, 233_472),  # H100, H200
)
_BY_CAPABILITY = {a.capability: a for a in ARCHS}


def arch(capability: int) -> Arch:
    """The budget of compute capability ``capability``; an unlisted one is budgeted as the
    smallest listed one (sm_86: what fits there fits every listed GPU)."""
    return _BY_CAPABILITY.get(capability) or min(ARCHS, key=lambda a: a.smem_per_block)


@functools.lru_cache(maxsize=None)
def _device_arch(index: int) -> tuple[Arch, int]:
    props = torch.cuda.get_device_properties(index)
    return arch(10 * props.major + props.minor), props.multi_processor_count


def device_arch(device: torch.device) -> tuple[Arch, int]:
    """(budget, number of SMs) of a CUDA device."""
    return _device_arch(device.index if device.index is not None else torch.cuda.current_device())
