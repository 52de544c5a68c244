"""Triton kernel of the blockwise spatial-affinity L1 loss (GPU; CPU tensors under TRITON_INTERPRET=1).

One program per (row block I, image b) sweeps all column blocks J, like flash-attention:
``D = x̂_s[:, I]ᵀ x̂_s[:, J] − x̂_t[:, I]ᵀ x̂_t[:, J]`` with ``tl.dot``, ``loss += Σ|D|``,
``G[:, I] += x̂[:, J] sign(D)ᵀ``. Each program owns its rows of G and its loss slot: no atomics,
deterministic. Without gradients, only blocks J ≥ I are visited (D is symmetric). With gradients,
entries closer to a tie than the rounding error (|D| < tie_bound) are recomputed in float64 from
the raw features, in the tiles that have any, so every sign is exact.
Channels are padded to a power of two (≥ 16, the smallest ``tl.dot`` size) inside the kernel.

Precision of the float32 products (``precision``, the ``input_precision`` of ``tl.dot``):
``"ieee"`` exact fp32 FMAs (default); ``"tf32x3"`` three TF32 tensor-core products, error
≈ fp32; ``"tf32"`` one TF32 product: operands rounded to 10 mantissa bits, entries of S and T
off by up to ≈ 1e-3 · C relative, so the loss is off by ~1e-4 relative and signs flip wherever
|S − T| is below that. (Estimates; the interpreter computes every mode in exact fp32.)
"""
import torch

from ._dispatch import triton_interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # dispatch never chooses "triton" without it (_dispatch.triton_status)
    triton = None

PRECISIONS = ("ieee", "tf32x3", "tf32")
#: Block size under the interpreter (autotuning is bypassed there) and the smallest config.
INTERPRETER_BLOCK = MIN_BLOCK = 64


def _padded_channels(c: int) -> int:
    return max(16, triton.next_power_of_2(c))


if triton is not None:

    @triton.jit
    def _exact_affinity(F, R, C, N, rows, cols, C_PAD: tl.constexpr):
        """(BLOCK, BLOCK) float64 block of x̂ᵀx̂ from the raw features and inverse norms."""
        c = tl.arange(0, C_PAD)
        f_i = tl.load(F + c[None, :] * N + rows[:, None], mask=(c[None, :] < C) & (rows[:, None] < N), other=0.0)
        f_j = tl.load(F + c[:, None] * N + cols[None, :], mask=(c[:, None] < C) & (cols[None, :] < N), other=0.0)
        r_i = tl.load(R + rows, mask=rows < N, other=0.0)
        r_j = tl.load(R + cols, mask=cols < N, other=0.0)
        a = tl.dot(f_i.to(tl.float64), f_j.to(tl.float64), input_precision="ieee", out_dtype=tl.float64)
        return a * r_i[:, None] * r_j[None, :]

    @triton.jit
    def _affinity_l1_kernel(
        XS, XT, GS, GT, FS, FT, RS, RT, PARTIAL, N, CS, CT, PARTIAL_STRIDE, TIE_BOUND,
        CS_PAD: tl.constexpr, CT_PAD: tl.constexpr, BLOCK: tl.constexpr,
        GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, PRECISION: tl.constexpr, EXACT_SIGNS: tl.constexpr,
    ):
        block = tl.program_id(0)
        image = tl.program_id(1).to(tl.int64)
        XS += image * CS * N
        XT += image * CT * N
        FS += image * CS * N
        FT += image * CT * N
        RS += image * N
        RT += image * N
        dtype = XS.dtype.element_ty
        cs = tl.arange(0, CS_PAD)
        ct = tl.arange(0, CT_PAD)
        rows = block * BLOCK + tl.arange(0, BLOCK)
        row_ok = rows < N
        # (BLOCK, C_PAD) row panels; padded channels and pixels load as 0 and contribute nothing
        xs_i = tl.load(XS + cs[None, :] * N + rows[:, None], mask=(cs[None, :] < CS) & row_ok[:, None], other=0.0)
        xt_i = tl.load(XT + ct[None, :] * N + rows[:, None], mask=(ct[None, :] < CT) & row_ok[:, None], other=0.0)
        loss = tl.zeros((BLOCK,), dtype)
        gs = tl.zeros((BLOCK, CS_PAD), dtype)
        gt = tl.zeros((BLOCK, CT_PAD), dtype)
        start = 0
        if not (GRAD_S or GRAD_T):
            start = block
        for j in range(start, tl.cdiv(N, BLOCK)):
            cols = j * BLOCK + tl.arange(0, BLOCK)
            col_ok = cols < N
            xs_j = tl.load(XS + cs[:, None] * N + cols[None, :], mask=(cs[:, None] < CS) & col_ok[None, :], other=0.0)
            xt_j = tl.load(XT + ct[:, None] * N + cols[None, :], mask=(ct[:, None] < CT) & col_ok[None, :], other=0.0)
            d = tl.dot(xs_i, xs_j, input_precision=PRECISION, out_dtype=dtype)
            d -= tl.dot(xt_i, xt_j, input_precision=PRECISION, out_dtype=dtype)
            if EXACT_SIGNS:  # recompute near-ties in float64 from the raw features
                tie = tl.abs(d) < TIE_BOUND
                if tl.max(tie.to(tl.int32)) > 0:
                    exact = _exact_affinity(FS, RS, CS, N, rows, cols, CS_PAD)
                    exact -= _exact_affinity(FT, RT, CT, N, rows, cols, CT_PAD)
                    d = tl.where(tie, exact.to(dtype), d)
            row_sum = tl.sum(tl.abs(d), axis=1)
            if not (GRAD_S or GRAD_T):
                row_sum *= tl.where(j == block, 1.0, 2.0).to(dtype)
            loss += row_sum
            sign = (tl.where(d > 0, 1.0, 0.0) - tl.where(d < 0, 1.0, 0.0)).to(dtype)
            if GRAD_S:
                gs = tl.dot(sign, tl.trans(xs_j), gs, input_precision=PRECISION)
            if GRAD_T:
                gt = tl.dot(sign, tl.trans(xt_j), gt, input_precision=PRECISION)
        tl.store(PARTIAL + image * PARTIAL_STRIDE + block, tl.sum(loss))
        if GRAD_S:
            tl.store(GS + image * CS * N + cs[None, :] * N + rows[:, None], gs, mask=(cs[None, :] < CS) & row_ok[:, None])
        if GRAD_T:
            tl.store(GT + image * CT * N + ct[None, :] * N + rows[:, None], gt, mask=(ct[None, :] < CT) & row_ok[:, None])

    # Configs for the GPU; the interpreter cannot run @triton.autotune, so it calls the kernel directly.
    _CONFIGS = [
        triton.Config({"BLOCK": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK": 128}, num_warps=8, num_stages=1),
    ]
    _autotuned_kernel = triton.autotune(_CONFIGS, key=["N", "CS_PAD", "CT_PAD", "GRAD_S", "GRAD_T", "PRECISION", "EXACT_SIGNS"])(
        _affinity_l1_kernel
    )


def affinity_l1_triton(xs, xt, grad_s: bool, grad_t: bool, precision: str, tie_bound: float, eps: float):
    """Σ|S − T| (float64 scalar) and G = Σ_j sign(D_ij) x̂_j for student / teacher (or None).

    xs, xt: prepared inputs (``affinity._Normalised``: x̂ (B, C, N) contiguous, raw F, norms).
    With tie_bound > 0, entries with |D| < tie_bound are recomputed in float64 (exact signs).
    """
    batch, cs, n = xs.xhat.shape
    ct = xt.xhat.shape[1]
    if xs.xhat.dtype == torch.float64:
        precision = "ieee"  # tensor cores have no float64 mode
    gs = torch.empty_like(xs.xhat) if grad_s else xs.xhat.new_empty(1)
    gt = torch.empty_like(xt.xhat) if grad_t else xt.xhat.new_empty(1)
    rs, rt = (xs.inverse_norm(eps), xt.inverse_norm(eps)) if tie_bound > 0 else (gs, gt)  # unused unless exact
    stride = triton.cdiv(n, MIN_BLOCK)
    partial = xs.xhat.new_zeros(batch, stride)  # slots past cdiv(n, BLOCK) stay 0
    args = (xs.xhat, xt.xhat, gs, gt, xs.raw, xt.raw, rs, rt, partial, n, cs, ct, stride, tie_bound)
    meta = dict(CS_PAD=_padded_channels(cs), CT_PAD=_padded_channels(ct), GRAD_S=grad_s, GRAD_T=grad_t,
                PRECISION=precision, EXACT_SIGNS=tie_bound > 0)
    if triton_interpreting():
        _affinity_l1_kernel[(triton.cdiv(n, INTERPRETER_BLOCK), batch)](*args, BLOCK=INTERPRETER_BLOCK, **meta)
    else:
        _autotuned_kernel[lambda cfg: (triton.cdiv(n, cfg["BLOCK"]), batch)](*args, **meta)
    return partial.sum(dtype=torch.float64), gs if grad_s else None, gt if grad_t else None
