"""The ``"cpp"`` backend of the affinity loss: ``dsclora_kernels._affinity`` (csrc/cpu/affinity.cpp),
exact float32 / float64 on the CPU, x̂ rows padded to the kernel's ``leading_dimension``."""
import torch

from .. import _extension, _native
from .prepare import Normalised, tie_bound

NAME, EXTENSION = "cpp", "affinity"
OP = "spatial_affinity_loss"


def status(device: torch.device) -> str:
    return _extension.cpu_status(EXTENSION, device)


def unsupported(*features: torch.Tensor) -> None:
    return None


def leading_dimension(n: int) -> int:
    """Row length of x̂ for N pixels that the kernel reads (N rounded up to its tile)."""
    return _extension.load(EXTENSION).leading_dimension(n)


def l1_pass(xs: Normalised, xt: Normalised, grad_s: bool, grad_t: bool, precision: str, eps: float):
    """Σ|S − T| and G_s, G_t (or None) with the C++ kernel; x̂ rows of its leading_dimension(N)."""
    gs = torch.zeros_like(xs.xhat) if grad_s else None
    gt = torch.zeros_like(xt.xhat) if grad_t else None
    bound = tie_bound((xs, xt), "ieee") if grad_s or grad_t else 0.0  # always exact float32 here
    rs, rt = (xs.inverse_norm(eps), xt.inverse_norm(eps)) if bound else (None, None)

    def arg(t, name, dtype=xs.xhat.dtype):
        return _native.tensor(t, f"{OP}: {name}", dtype, "contiguous")

    total = _native.call(
        EXTENSION, "affinity_l1", arg(xs.xhat, "x̂_s"), arg(xt.xhat, "x̂_t"), arg(gs, "G_s"), arg(gt, "G_t"),
        arg(xs.raw, "F_s"), arg(xt.raw, "F_t"), arg(rs, "1/(‖F_s‖+eps)", torch.float64),
        arg(rt, "1/(‖F_t‖+eps)", torch.float64),
        tie_bound=bound, threads=torch.get_num_threads(),
    )
    return torch.tensor(total, dtype=torch.float64), gs, gt
