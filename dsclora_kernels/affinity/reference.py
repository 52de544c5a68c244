"""The spatial-affinity distillation loss of SPEC §4, materialised: the specification, and the
``"reference"`` backend of the fused op (its pass materialises D in float64).

It builds the (B, N, N) affinity matrices, so it is only for tests and tiny inputs; the fused op
``dsclora_kernels.spatial_affinity_loss`` computes the same value and gradient in O(B·C·N) memory.
"""
import torch

from .prepare import Normalised, differences

NAME = "reference"
REDUCTIONS = ("mean", "sum")


def normalised_pixels(f: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, C, H, W) -> F̂ (B, C, N): every pixel's channel vector divided by (its L2 norm + eps)."""
    x = f.flatten(2)
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)


def spatial_affinity_loss_reference(
    f_student: torch.Tensor,
    f_teacher: torch.Tensor,
    *,
    reduction: str = "mean",
    p: int = 1,
    eps: float = 1e-8,
) -> torch.Tensor:
    """mean (or sum) over b, i, j of |A_S − A_T|^p with A = F̂ᵀF̂ (B, N, N) per feature map.

    f_student (B, Cs, H, W) and f_teacher (B, Ct, H, W) may differ in channels only.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    x_s, x_t = normalised_pixels(f_student, eps), normalised_pixels(f_teacher, eps)
    difference = x_s.transpose(1, 2) @ x_s - x_t.transpose(1, 2) @ x_t
    difference = difference.abs() if p == 1 else difference.square()
    return difference.mean() if reduction == "mean" else difference.sum()


# ---- the "reference" backend of the fused op ----

def status(device: torch.device) -> str:
    return "available"


def unsupported(*features: torch.Tensor) -> None:
    return None


def leading_dimension(n: int) -> int:
    return n


def l1_pass(xs: Normalised, xt: Normalised, grad_s: bool, grad_t: bool, precision: str, eps: float):
    """Σ|S − T| and G_s, G_t (or None), materialising D (B, N, N) in float64: tiny inputs, other devices."""
    d = differences(xs, xt, eps)
    sign = d.sign().to(xs.xhat.dtype)  # symmetric: G = x̂ sign(D)
    g = [x.xhat @ sign if wanted else None for x, wanted in ((xs, grad_s), (xt, grad_t))]
    return d.abs().sum(), *g
