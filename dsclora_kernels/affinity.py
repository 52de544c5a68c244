"""The spatial-affinity distillation loss (SPEC §4) as a fused, differentiable op.

``spatial_affinity_loss`` equals ``spatial_affinity_loss_reference`` but never builds the
(B, N, N) affinity matrices: memory O(B·C·N). For p = 1:

1. normalise: x̂ = F / (‖F‖ + eps) per pixel (torch, O(B·C·N));
2. one blockwise pass (C++ ``_affinity`` on the CPU, Triton on CUDA, chosen by
   ``_dispatch.choose``) gives Σ|S − T| and, for each input that needs a gradient,
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
(``affinity_squared``).
"""
from typing import NamedTuple

import torch

from . import _dispatch, _extension, _native
from .affinity_reference import REDUCTIONS
from .affinity_squared import squared_affinity_loss

OP, EXTENSION = "spatial_affinity_loss", "affinity"
PRECISIONS = ("ieee", "tf32x3", "tf32")  # tl.dot input precisions; the C++ kernel is always exact fp32
#: Tensor cores with exact signs (affinity_triton): the loss within ~1e-7 and the gradient within
#: ~1e-6 of float64 (the fp32 level), ≈ 3x one TF32 product's time.
DEFAULT_PRECISION = "tf32x3"
#: Bytes of float64 temporaries the normalisation and its backward hold at once (images in chunks).
CHUNK_BYTES = 64 << 20


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
    for p = 1 on CUDA (default "tf32x3": tensor cores, exact signs; see affinity_triton).
    Differentiable w.r.t. both inputs (no double backward).
    """
    _check_arguments(f_student, f_teacher, reduction, p, precision)
    if p == 2:
        dtype = _compute_dtype(f_student, f_teacher)
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


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _result_dtype(f_student: torch.Tensor, f_teacher: torch.Tensor) -> torch.dtype:
    return torch.promote_types(f_student.dtype, f_teacher.dtype)


class _Normalised(NamedTuple):
    """One input, prepared: x̂ (B, C, ld) zero beyond the N pixels, the raw features F (B, C, N)
    contiguous, and the pixel norms ‖F‖ (B, 1, N) in float64."""

    xhat: torch.Tensor
    raw: torch.Tensor
    norm: torch.Tensor

    def inverse_norm(self, eps: float) -> torch.Tensor:
        return (1.0 / (self.norm + eps)).squeeze(1).contiguous()


def _normalise(f: torch.Tensor, eps: float, dtype: torch.dtype, ld: int | None = None) -> _Normalised:
    """x̂ = F / (‖F‖ + eps) per pixel in ``dtype``, rows of ``ld`` ≥ N elements (default N)."""
    raw = f.flatten(2).to(dtype).contiguous()
    batch, channels, n = raw.shape
    norm = raw.new_empty(batch, 1, n, dtype=torch.float64)
    xhat = raw.new_empty(batch, channels, ld or n)
    xhat[..., n:].zero_()
    # In float64, a chunk of images at a time (a bounded temporary), so x̂ is correctly rounded: a
    # rounded 1 / (‖F‖ + eps) would scale a whole pixel by one shared error, a bias that does not
    # average out in Σ|S − T| when student ≈ teacher (measured: 4x the loss error).
    for images in _chunks(batch, 8 * channels * n):
        block = raw[images].to(torch.float64, copy=True)
        torch.linalg.vector_norm(block, dim=1, keepdim=True, out=norm[images])
        xhat[images, :, :n].copy_(block.div_(norm[images] + eps))
    return _Normalised(xhat, raw, norm)


def _chunks(batch: int, bytes_per_image: int) -> list[slice]:
    """Slices of the batch whose float64 temporaries stay within CHUNK_BYTES (at least one image):
    few launches for many small images, bounded memory for large ones."""
    step = max(1, CHUNK_BYTES // bytes_per_image)
    return [slice(b, min(b + step, batch)) for b in range(0, batch, step)]


def _tie_bound(prepared: tuple[_Normalised, _Normalised], precision: str) -> float:
    """|D| below which a computed sign may be wrong; 0 in float64 (no refinement needed).

    With u = 2⁻²⁴ and unit pixel vectors (Σ_c |a_c||b_c| ≤ 1), each of S and T is off by:
    "ieee": x̂ correctly rounded (≤ 2u) plus a C-term fp32 dot (≤ C·u): |D_computed − D| ≤
    (Cs + Ct + 4)·u; we use (Cs + Ct + 16)·u.
    "tf32x3" (Triton: a_big = TF32(a) rounded to nearest, a_small = a − a_big read by the tensor
    cores with its 13 low bits dropped; a·b ≈ a_big·b_big + a_small·b_big + a_big·b_small, kept
    products exact): the dropped a_small·b_small and truncations ≤ 2⁻²² + 2·2⁻²¹ = 20u per unit
    product; x̂'s rounding 2u; the a_big·b_big chain of C fp32 additions with partial sums ≤ 1,
    ≤ 2u each if the tensor cores truncate (≤ 2.25·C·u in the 8-product block model of A100-class
    MMA), the small chains ≈ 2⁻¹⁰ of that: (3C + 25)·u each, so we use (3(Cs + Ct) + 50)·u
    (≈ 1.3e-5 for 26 / 28 channels; the error emulated on the CPU is ≈ 4u, tests/test_affinity.py).
    "tf32" is not refined (its bound, ≈ 2⁻⁹, would cover most tiles)."""
    xs, xt = prepared
    if xs.xhat.dtype == torch.float64:
        return 0.0
    return tie_bound_for(xs.xhat.shape[1], xt.xhat.shape[1], precision)


def tie_bound_for(cs: int, ct: int, precision: str) -> float:
    """``_tie_bound`` of float32 features with cs / ct channels."""
    if precision == "tf32":
        return 0.0
    return (3 * (cs + ct) + 50 if precision == "tf32x3" else cs + ct + 16) * 2.0**-24


def _input_gradient(f: torch.Tensor, g: torch.Tensor, prepared: _Normalised, eps: float, factor: float):
    """∂L/∂F (shape and dtype of f) for x̂ = F / (‖F‖ + eps), given ∂L/∂x̂ = factor · g:
    g/(‖F‖ + eps) − x̂ (x̂ᵀg)/‖F‖ per pixel, computed in place in g (B, C, ld)."""
    n = prepared.norm.shape[-1]
    g, xhat, norm = g[..., :n], prepared.xhat[..., :n], prepared.norm
    per_norm = torch.where(norm > 0, factor / norm, 0.0)  # zero pixels: x̂ = 0, no radial part
    for images in _chunks(g.shape[0], 8 * g.shape[1] * n):  # the x̂ᵀg product is a bounded temporary
        radial = (torch.linalg.vecdot(xhat[images], g[images], dim=1).unsqueeze(1) * per_norm[images]).to(g.dtype)
        g[images].mul_((factor / (norm[images] + eps)).to(g.dtype)).addcmul_(xhat[images], radial, value=-1)
    return g.reshape(f.shape).contiguous().to(f.dtype)


def _pass_cpp(xs: _Normalised, xt: _Normalised, grad_s: bool, grad_t: bool, precision: str, eps: float):
    """Σ|S − T| and G_s, G_t (or None) with the C++ kernel; x̂ rows of its leading_dimension(N)."""
    gs = torch.zeros_like(xs.xhat) if grad_s else None
    gt = torch.zeros_like(xt.xhat) if grad_t else None
    tie_bound = _tie_bound((xs, xt), "ieee") if grad_s or grad_t else 0.0  # always exact float32 here
    rs, rt = (xs.inverse_norm(eps), xt.inverse_norm(eps)) if tie_bound else (None, None)

    def arg(t, name, dtype=xs.xhat.dtype):
        return _native.tensor(t, f"{OP}: {name}", dtype, "contiguous")

    total = _native.call(
        EXTENSION, "affinity_l1", arg(xs.xhat, "x̂_s"), arg(xt.xhat, "x̂_t"), arg(gs, "G_s"), arg(gt, "G_t"),
        arg(xs.raw, "F_s"), arg(xt.raw, "F_t"), arg(rs, "1/(‖F_s‖+eps)", torch.float64),
        arg(rt, "1/(‖F_t‖+eps)", torch.float64),
        tie_bound=tie_bound, threads=torch.get_num_threads(),
    )
    return torch.tensor(total, dtype=torch.float64), gs, gt


def _pass_triton(xs: _Normalised, xt: _Normalised, grad_s: bool, grad_t: bool, precision: str, eps: float):
    from .affinity_triton import affinity_l1_triton  # imports triton: only when it runs

    tie_bound = _tie_bound((xs, xt), precision) if grad_s or grad_t else 0.0
    return affinity_l1_triton(xs, xt, grad_s, grad_t, precision, tie_bound, eps)


def _differences(xs: _Normalised, xt: _Normalised, eps: float) -> torch.Tensor:
    """D = S − T (B, N, N) in float64 from the raw features: the values whose signs the kernels use."""

    def affinity(x: _Normalised):
        r = x.inverse_norm(eps).unsqueeze(1)
        raw = x.raw.double()
        return (raw.transpose(1, 2) @ raw) * (r.transpose(1, 2) * r)

    return affinity(xs) - affinity(xt)


def _pass_reference(xs: _Normalised, xt: _Normalised, grad_s: bool, grad_t: bool, precision: str, eps: float):
    """The same three results, materialising D (B, N, N) in float64: tiny inputs, other devices."""
    d = _differences(xs, xt, eps)
    sign = d.sign().to(xs.xhat.dtype)  # symmetric: G = x̂ sign(D)
    g = [x.xhat @ sign if wanted else None for x, wanted in ((xs, grad_s), (xt, grad_t))]
    return d.abs().sum(), *g


_PASSES = {"cpp": _pass_cpp, "triton": _pass_triton, "reference": _pass_reference}


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
    backend = _dispatch.choose(OP, EXTENSION, f_student.device)
    n = f_student.shape[2] * f_student.shape[3]
    ld = _extension.load(EXTENSION).leading_dimension(n) if backend == "cpp" else n
    dtype = _compute_dtype(f_student, f_teacher)
    xs, xt = _normalise(f_student, eps, dtype, ld), _normalise(f_teacher, eps, dtype, ld)
    total, gs, gt = _PASSES[backend](xs, xt, grad_student, grad_teacher, precision, eps)
    batch = f_student.shape[0]
    scale = 1.0 / (batch * n * n) if reduction == "mean" else 1.0
    loss = (total * scale).to(_result_dtype(f_student, f_teacher))
    # teacher first, then its buffers go: the peak stays near x̂_s + x̂_t + G
    grad_t = f_teacher.new_empty(0) if gt is None else _input_gradient(f_teacher, gt, xt, eps, -2 * scale)
    del xt, gt
    grad_s = f_student.new_empty(0) if gs is None else _input_gradient(f_student, gs, xs, eps, 2 * scale)
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
