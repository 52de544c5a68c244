"""The spatial-affinity distillation loss (SPEC §4) as a fused, differentiable op.

``spatial_affinity_loss`` equals ``spatial_affinity_loss_reference`` but never builds the
(B, N, N) affinity matrices: memory O(B·C·N). For p = 1:

1. normalise: x̂ = F / (‖F‖ + eps) per pixel (torch, O(B·C·N));
2. one blockwise pass (C++ ``_affinity`` on the CPU, ``cpu.py``; Triton on CUDA, ``triton.py``;
   chosen by the registry ``BACKENDS``) gives Σ|S − T| and, for each input that needs a gradient,
   G = Σ_j sign(D_ij) x̂_j, so that ∂L/∂x̂_s = 2·scale·G_s and ∂L/∂x̂_t = −2·scale·G_t;
3. the normalisation backward gives ∂L/∂F.
Signs are exact: with gradients, entries within the float32 rounding bound of a tie (|D| < tie
bound) are recomputed in float64 from the raw features (C++: the tied rows of a micro-tile at a
time, by the same vector code in double). Cost of fwd + bwd against unrelated features, C++ at
64 x 64, one thread (measured, ``bench/bench_affinity.py --ties``): 1.3x for a student within
1 % of the teacher, 2.3-2.5x when every entry is a tie (student = teacher, or flat images where
S ≈ T ≈ 1); entry-by-entry scalar refinement cost 1.5x and 35-39x.
The forward computes the gradients in the same pass (Liger-Kernel's fused cross-entropy pattern);
the backward only scales them by grad_output. p = 2 reduces to C x C Gram matrices
(``affinity.squared``).
"""
import torch

from .. import _dispatch, triton_support
from . import cpu, reference
from .prepare import compute_dtype, input_gradient, normalise
from .reference import REDUCTIONS
from .squared import squared_affinity_loss

OP = "spatial_affinity_loss"
#: Backends per device type, fastest first (the reference ends every list).
BACKENDS = _dispatch.Registry(OP, reference, cpu=(cpu,),
                             cuda=(_dispatch.LazyBackend(f"{__name__}.triton", "triton", triton_support.status),))
PRECISIONS = ("ieee", "tf32x3", "tf32")  # tl.dot input precisions; the C++ kernel is always exact fp32
#: Tensor cores with exact signs (affinity.triton): the loss within ~1e-7 and the gradient within
#: ~1e-6 of float64 (the fp32 level), ≈ 3x one TF32 product's time.
DEFAULT_PRECISION = "tf32x3"


def spatial_affinity_loss(
    f_student: torch.Tensor,
    f_teacher: torch.Tensor,
    *,
    reduction: str = "mean",
    p: int = 1,
    eps: float = 1e-8,
    precision: str = DEFAULT_PRECISION,
) -> torch.Tensor:
    """mean (or sum) over b, i, j of |A_S − A_T|^p, A = F̂ᵀF̂ the (N x N) cosine affinity per image.

    f_student (B, Cs, H, W) and f_teacher (B, Ct, H, W), any float dtype and strides; computed in
    float32 (float64 if an input is float64). ``precision`` selects the Triton ``tl.dot`` mode
    for p = 1 on CUDA (default "tf32x3": tensor cores, exact signs; see affinity.triton).
    Differentiable w.r.t. both inputs (no double backward).
    """
    _check_arguments(f_student, f_teacher, reduction, p, precision)
    if p == 2:
        dtype = compute_dtype(f_student, f_teacher)
        loss = squared_affinity_loss(f_student, f_teacher, reduction=reduction, eps=eps, dtype=dtype)
        return loss.to(_result_dtype(f_student, f_teacher))
    grad = torch.is_grad_enabled()
    loss, _, _ = spatial_affinity_l1(
        f_student, f_teacher, reduction, eps, precision, grad and f_student.requires_grad, grad and f_teacher.requires_grad
    )
    return loss


def _check_arguments(f_student, f_teacher, reduction, p, precision) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"spatial_affinity_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if p not in (1, 2):
        raise ValueError(f"spatial_affinity_loss: p must be 1 or 2, got {p!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"spatial_affinity_loss: precision must be one of {PRECISIONS}, got {precision!r}")
    for name, f in (("f_student", f_student), ("f_teacher", f_teacher)):
        if not isinstance(f, torch.Tensor) or f.dim() != 4 or not f.is_floating_point() or 0 in f.shape:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"spatial_affinity_loss: {name} must be a non-empty float (B, C, H, W) tensor, got {shape}")
    if f_student.shape[0] != f_teacher.shape[0] or f_student.shape[2:] != f_teacher.shape[2:]:
        raise ValueError(
            f"spatial_affinity_loss: student {tuple(f_student.shape)} and teacher {tuple(f_teacher.shape)} "
            "must agree in batch and spatial size"
        )
    if f_student.device != f_teacher.device:
        raise ValueError(f"spatial_affinity_loss: student on {f_student.device}, teacher on {f_teacher.device}")


def _result_dtype(f_student: torch.Tensor, f_teacher: torch.Tensor) -> torch.dtype:
    return torch.promote_types(f_student.dtype, f_teacher.dtype)


@torch.library.custom_op("dsclora::spatial_affinity_l1", mutates_args=())
def spatial_affinity_l1(
    f_student: torch.Tensor,
    f_teacher: torch.Tensor,
    reduction: str,
    eps: float,
    precision: str,
    grad_student: bool,
    grad_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ∂loss/∂f_student, ∂loss/∂f_teacher) of the p = 1 affinity loss; a gradient that
    was not asked for is an empty tensor. Use ``spatial_affinity_loss``, which sets the flags."""
    backend = BACKENDS.choose(f_student.device, f_student, f_teacher)
    n = f_student.shape[2] * f_student.shape[3]
    ld = backend.leading_dimension(n)
    dtype = compute_dtype(f_student, f_teacher)
    xs, xt = normalise(f_student, eps, dtype, ld), normalise(f_teacher, eps, dtype, ld)
    total, gs, gt = backend.l1_pass(xs, xt, grad_student, grad_teacher, precision, eps)
    batch = f_student.shape[0]
    scale = 1.0 / (batch * n * n) if reduction == "mean" else 1.0
    loss = (total * scale).to(_result_dtype(f_student, f_teacher))
    # teacher first, then its buffers go: the peak stays near x̂_s + x̂_t + G
    grad_t = f_teacher.new_empty(0) if gt is None else input_gradient(f_teacher, gt, xt, eps, -2 * scale)
    del xt, gt
    grad_s = f_student.new_empty(0) if gs is None else input_gradient(f_student, gs, xs, eps, 2 * scale)
    return loss, grad_s, grad_t


@spatial_affinity_l1.register_fake
def _(f_student, f_teacher, reduction, eps, precision, grad_student, grad_teacher):
    def gradient(f, wanted):
        return f.new_empty(f.shape) if wanted else f.new_empty(0)

    loss = f_student.new_empty((), dtype=_result_dtype(f_student, f_teacher))
    return loss, gradient(f_student, grad_student), gradient(f_teacher, grad_teacher)


def _setup_context(ctx, inputs, output):
    ctx.grad_student, ctx.grad_teacher = inputs[5], inputs[6]
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, _grad_s, _grad_t):
    grad_s, grad_t = ctx.saved_tensors
    if (ctx.needs_input_grad[0] and not ctx.grad_student) or (ctx.needs_input_grad[1] and not ctx.grad_teacher):
        raise RuntimeError("spatial_affinity_l1: an input needs a gradient the forward was told not to compute "
                           "(call spatial_affinity_loss, which sets grad_student / grad_teacher)")
    return (
        grad_s * grad_loss.to(grad_s.dtype) if ctx.grad_student else None,
        grad_t * grad_loss.to(grad_t.dtype) if ctx.grad_teacher else None,
        None, None, None, None, None,
    )


spatial_affinity_l1.register_autograd(_backward, setup_context=_setup_context)
