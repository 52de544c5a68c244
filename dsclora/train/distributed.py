"""Process-group setup for multi-GPU / multi-node runs started by ``torchrun``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a single process.
CUDA runs use NCCL with one GPU per process (``cuda:LOCAL_RANK``), CPU runs use gloo.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available, else cpu; anything else as torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def setup(device_name: str) -> Context:
    """Join the torchrun process group (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size == 1:
        return Context(0, 1, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), device)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def all_true(ctx: Context, flag: torch.Tensor) -> bool:
    """Whether ``flag`` (a bool scalar tensor) is true on every process."""
    if ctx.distributed:
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def mean(ctx: Context, value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the processes."""
    if ctx.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= ctx.world_size
    return value


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
