"""Triton kernel of the blockwise spatial-affinity L1 loss (GPU; CPU tensors under TRITON_INTERPRET=1).

One program per (row block I, image b) sweeps all column blocks J, like flash-attention:
``D = x̂_s[:, I]ᵀ x̂_s[:, J] − x̂_t[:, I]ᵀ x̂_t[:, J]`` with ``tl.dot``, ``loss_I += Σ_J |D|``,
``G[:, I] += x̂[:, J] sign(D)ᵀ``. Each program owns its rows of G and of the loss: no atomics,
deterministic. Without gradients, only blocks J ≥ I are visited (D is symmetric). With gradients,
entries closer to a tie than the rounding error (|D| < tie_bound) are recomputed in float64 from
the raw features, in the tiles that have any, so every sign is exact.
Channels are padded to a power of two (≥ 16, the smallest ``tl.dot`` size) inside the kernel.

Precision of the float32 products (``precision``, the ``input_precision`` of ``tl.dot``):
``"ieee"`` exact fp32 FMAs on CUDA cores (default); ``"tf32x3"`` three TF32 tensor-core products,
≈ 4x the fp32 rounding (its tie bound is 4x wider); ``"tf32"`` one TF32 product: 10-bit mantissas,
≈ 5e-4 relative per product, so S and T entries are off by up to ~C·5e-4 (typically √C·5e-4):
signs flip wherever |S − T| is below that (no tie refinement) and the loss is biased by those
entries. These are derived, not measured: the interpreter computes every mode in exact fp32.
"""
from typing import NamedTuple

import torch

from .. import _launches, gpu_arch, triton_support
from ..triton_support import padded_channels, triton_interpreting
from .prepare import Normalised, normalise, tie_bound

try:
    import triton
    import triton.language as tl
except ImportError:  # the registry never chooses "triton" without it (triton_support.triton_status)
    triton = None

NAME = "triton"

#: Row block under the interpreter (autotuning is bypassed there); its column block is half of it,
#: so the rectangular-tile logic is what CI tests.
INTERPRETER_BLOCK = 64


#: GPU autotuning candidates (BLOCK_I, BLOCK_J, num_warps, num_stages) per product: tensor-core
#: tiles for tf32; tf32x3 (3 products on split operands) and exact fp32 / fp64 FMAs on CUDA cores
#: (dot operands are register arrays over the whole channel depth) need smaller tiles: larger
#: ones spill kilobytes (measured with triton_budget). ``gpu_blocks`` drops those whose shared
#: memory may exceed the GPU's budget, leaving SMALL_BLOCK if none fits.
SMALL_BLOCK = (32, 32, 4, 2)
GPU_BLOCKS = {
    "tf32": ((128, 64, 8, 2), (64, 32, 4, 2)),
    "tf32x3": ((64, 32, 4, 2),),
    "ieee": (SMALL_BLOCK,),
    "fp64": (SMALL_BLOCK,),
}


def shared_bound(block: tuple, meta: dict, itemsize: int) -> float:
    """Bytes of shared memory a block (BLOCK_I, BLOCK_J, warps, stages) needs at most for a launch
    (``meta``: its constexprs): operand, pipeline and layout-conversion buffers take at most 1.5x
    itemsize x (CS_PAD + CT_PAD) x (BLOCK_I + BLOCK_J), 2.5x with tf32x3's split operands
    (measured with triton_budget, Triton 3.9: up to 1.33x / 1.5x / 2.33x for fp64 / fp32 and tf32 /
    tf32x3). tests/test_triton_budget.py checks every block this lets through."""
    block_i, block_j, _, _ = block
    factor = 2.5 if meta["PRECISION"] == "tf32x3" and itemsize == 4 else 1.5
    return factor * itemsize * (meta["CS_PAD"] + meta["CT_PAD"]) * (block_i + block_j)


def gpu_blocks(arch: gpu_arch.Arch, meta: dict, itemsize: int) -> list[tuple]:
    """The autotuning candidates of a launch on ``arch``: those of its kind of product whose
    ``shared_bound`` fits the architecture, else SMALL_BLOCK (tests/test_triton_budget.py
    checks it fits)."""
    kind = "fp64" if itemsize == 8 else meta["PRECISION"]
    fitting = [b for b in GPU_BLOCKS[kind] if shared_bound(b, meta, itemsize) <= arch.smem_per_block]
    return fitting or [SMALL_BLOCK]


if triton is not None:

    @triton.jit
    def _exact_affinity(F, R, C, N, rows, cols, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        """(BLOCK_I, BLOCK_J) float64 block of x̂ᵀx̂ from the raw features and inverse norms, one
        channel at a time (CUDA-core FMAs: no extra register tiles). Operands are scaled before
        the product, so S and T take identical operations (exact ties stay 0)."""
        r_i = tl.load(R + rows, mask=rows < N, other=0.0)
        r_j = tl.load(R + cols, mask=cols < N, other=0.0)
        acc = tl.zeros((BLOCK_I, BLOCK_J), tl.float64)
        for c in range(C):
            a = tl.load(F + c * N + rows, mask=rows < N, other=0.0).to(tl.float64) * r_i
            b = tl.load(F + c * N + cols, mask=cols < N, other=0.0).to(tl.float64) * r_j
            acc += a[:, None] * b[None, :]
        return acc

    # N, CS, CT not specialised: one compiled kernel per configuration whatever the image size
    # (the tiles are compute-bound: x̂ loads without N's divisibility cost little).
    @triton.jit(do_not_specialize=["N", "CS", "CT", "TIE_BOUND"])
    def _affinity_l1_kernel(
        XS, XT, GS, GT, FS, FT, RS, RT, ROW_LOSS, N, CS, CT, TIE_BOUND,
        CS_PAD: tl.constexpr, CT_PAD: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
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
        rows = block * BLOCK_I + tl.arange(0, BLOCK_I)
        row_ok = rows < N
        # (BLOCK, C_PAD) row panels; padded channels and pixels load as 0 and contribute nothing
        xs_i = tl.load(XS + cs[None, :] * N + rows[:, None], mask=(cs[None, :] < CS) & row_ok[:, None], other=0.0)
        xt_i = tl.load(XT + ct[None, :] * N + rows[:, None], mask=(ct[None, :] < CT) & row_ok[:, None], other=0.0)
        loss = tl.zeros((BLOCK_I,), tl.float64)  # up to N / BLOCK_J tile sums per row
        gs = tl.zeros((BLOCK_I, CS_PAD), dtype)
        gt = tl.zeros((BLOCK_I, CT_PAD), dtype)
        start = 0
        if not (GRAD_S or GRAD_T):  # from the diagonal square on (BLOCK_I is a multiple of BLOCK_J)
            start = block * (BLOCK_I // BLOCK_J)
        for j in range(start, tl.cdiv(N, BLOCK_J)):
            cols = j * BLOCK_J + tl.arange(0, BLOCK_J)
            col_ok = cols < N
            xs_j = tl.load(XS + cs[:, None] * N + cols[None, :], mask=(cs[:, None] < CS) & col_ok[None, :], other=0.0)
            xt_j = tl.load(XT + ct[:, None] * N + cols[None, :], mask=(ct[:, None] < CT) & col_ok[None, :], other=0.0)
            d = tl.dot(xs_i, xs_j, input_precision=PRECISION, out_dtype=dtype)
            d -= tl.dot(xt_i, xt_j, input_precision=PRECISION, out_dtype=dtype)
            if EXACT_SIGNS:  # recompute near-ties in float64 from the raw features
                tie = tl.abs(d) < TIE_BOUND
                if tl.max(tie.to(tl.int32)) > 0:
                    exact = _exact_affinity(FS, RS, CS, N, rows, cols, BLOCK_I, BLOCK_J)
                    exact -= _exact_affinity(FT, RT, CT, N, rows, cols, BLOCK_I, BLOCK_J)
                    d = tl.where(tie, exact.to(dtype), d)
            if GRAD_S or GRAD_T:
                loss += tl.sum(tl.abs(d), axis=1).to(tl.float64)
            else:  # pairs inside the diagonal square once (both orders are in it), the rest twice
                weight = tl.where(cols < (block + 1) * BLOCK_I, 1.0, 2.0).to(dtype)
                loss += tl.sum(tl.abs(d) * weight[None, :], axis=1).to(tl.float64)
            sign = (tl.where(d > 0, 1.0, 0.0) - tl.where(d < 0, 1.0, 0.0)).to(dtype)
            if GRAD_S:
                gs = tl.dot(sign, tl.trans(xs_j), gs, input_precision=PRECISION, out_dtype=dtype)
            if GRAD_T:
                gt = tl.dot(sign, tl.trans(xt_j), gt, input_precision=PRECISION, out_dtype=dtype)
        tl.store(ROW_LOSS + image * N + rows, loss, mask=row_ok)
        if GRAD_S:
            tl.store(GS + image * CS * N + cs[None, :] * N + rows[:, None], gs, mask=(cs[None, :] < CS) & row_ok[:, None])
        if GRAD_T:
            tl.store(GT + image * CT * N + ct[None, :] * N + rows[:, None], gt, mask=(ct[None, :] < CT) & row_ok[:, None])

    # Configs for the GPU, pruned per architecture (``_prune``); the interpreter cannot run
    # @triton.autotune, so it calls the kernel directly.
    _CONFIGS = [
        triton.Config({"BLOCK_I": bi, "BLOCK_J": bj}, num_warps=warps, num_stages=stages)
        for bi, bj, warps, stages in sorted({b for blocks in GPU_BLOCKS.values() for b in blocks})
    ]

    def _prune(configs, named_args, **meta):
        """The configs that are candidates for this launch and fit the device's budget."""
        arch, _ = gpu_arch.device_arch(named_args["XS"].device)
        wanted = gpu_blocks(arch, meta, named_args["XS"].element_size())
        return [c for c in configs
                if (c.kwargs["BLOCK_I"], c.kwargs["BLOCK_J"], c.num_warps, c.num_stages) in wanted]

    _autotuned_kernel = triton.autotune(
        _CONFIGS, key=["N", "CS_PAD", "CT_PAD", "GRAD_S", "GRAD_T", "PRECISION", "EXACT_SIGNS"],
        prune_configs_by={"early_config_prune": _prune},
    )(_affinity_l1_kernel)


def _kernel_call(xs, xt, grad_s: bool, grad_t: bool, precision: str, tie_bound: float, eps: float):
    """(arguments, constexprs, (row_loss, G_s, G_t)) of the kernel launch for ``affinity_l1_triton``."""
    batch, cs, n = xs.xhat.shape
    ct = xt.xhat.shape[1]
    if xs.xhat.dtype == torch.float64:
        precision = "ieee"  # tensor cores have no float64 mode
    gs = torch.empty_like(xs.xhat) if grad_s else xs.xhat.new_empty(1)
    gt = torch.empty_like(xt.xhat) if grad_t else xt.xhat.new_empty(1)
    rs, rt = (xs.inverse_norm(eps), xt.inverse_norm(eps)) if tie_bound > 0 else (gs, gt)  # unused unless exact
    # Σ_j |D_ij| per row i: every config writes all of it (autotuning runs several on one buffer)
    row_loss = xs.xhat.new_empty(batch, n, dtype=torch.float64)
    args = (xs.xhat, xt.xhat, gs, gt, xs.raw, xt.raw, rs, rt, row_loss, n, cs, ct, tie_bound)
    meta = dict(CS_PAD=padded_channels(cs), CT_PAD=padded_channels(ct), GRAD_S=grad_s, GRAD_T=grad_t,
                PRECISION=precision, EXACT_SIGNS=tie_bound > 0)
    return args, meta, (row_loss, gs if grad_s else None, gt if grad_t else None)


def affinity_l1_triton(xs, xt, grad_s: bool, grad_t: bool, precision: str, tie_bound: float, eps: float):
    """Σ|S − T| (float64 scalar) and G = Σ_j sign(D_ij) x̂_j for student / teacher (or None).

    xs, xt: prepared inputs (``prepare.Normalised``: x̂ (B, C, N) contiguous, raw F, norms).
    With tie_bound > 0, entries with |D| < tie_bound are recomputed in float64 (exact signs).
    """
    if grad_t and not grad_s:  # one compiled variant fewer: swap the roles. Σ|S − T| is symmetric,
        # and sign(T − S) = −sign(S − T) makes the swapped pair's student G minus the teacher's.
        total, g, _ = affinity_l1_triton(xt, xs, True, False, precision, tie_bound, eps)
        return total, None, g.neg_()
    args, meta, (row_loss, gs, gt) = _kernel_call(xs, xt, grad_s, grad_t, precision, tie_bound, eps)
    batch, n = row_loss.shape
    if triton_interpreting():
        grid = (triton.cdiv(n, INTERPRETER_BLOCK), batch)
        _affinity_l1_kernel[grid](*args, BLOCK_I=INTERPRETER_BLOCK, BLOCK_J=INTERPRETER_BLOCK // 2, **meta)
    else:
        _autotuned_kernel[lambda cfg: (triton.cdiv(n, cfg["BLOCK_I"]), batch)](*args, **meta)
    _launches.record("affinity_l1")
    return row_loss.sum(), gs, gt


# ---- the "triton" backend of the affinity loss ----

def status(device: torch.device) -> str:
    return triton_support.status(device)


def unsupported(*features: torch.Tensor) -> None:
    return None


def leading_dimension(n: int) -> int:
    return n


def l1_pass(xs: Normalised, xt: Normalised, grad_s: bool, grad_t: bool, precision: str, eps: float):
    """Σ|S − T| and G_s, G_t (or None) with the kernel, signs exact (tie bound) with gradients."""
    bound = tie_bound((xs, xt), precision) if grad_s or grad_t else 0.0
    return affinity_l1_triton(xs, xt, grad_s, grad_t, precision, bound, eps)


# ---- ahead-of-time compilation (triton_budget) ----

class AotCase(NamedTuple):
    dtype: torch.dtype
    mode: str
    config: str
    build: tuple  # aot_launch's arguments after (cs, ct)


def _aot_inputs(cs: int, ct: int, dtype: torch.dtype, grad_s: bool, grad_t: bool, precision: str):
    """The launch ``l1_pass`` makes for CUDA features (1, cs|ct, 32, 32) of ``dtype``,
    built on CPU tensors: (arguments, constexprs)."""
    eps = 1e-8
    xs, xt = (normalise(torch.ones(1, c, 32, 32, dtype=dtype), eps, dtype) for c in (cs, ct))
    bound = tie_bound((xs, xt), precision) if grad_s or grad_t else 0.0  # as l1_pass
    args, meta, _ = _kernel_call(xs, xt, grad_s, grad_t, precision, bound, eps)
    return args, meta


def aot_cases(cs: int, ct: int, arch: gpu_arch.Arch) -> list[AotCase]:
    """Every launch of the kernel for cs / ct channels on ``arch``: dtypes, gradients (teacher-only
    runs as student-only), precisions, and each autotuning config left after pruning."""
    cases = []
    for dtype in (torch.float32, torch.float64):
        for grad_s, grad_t in ((False, False), (True, False), (True, True)):
            for precision in (("ieee", "tf32x3", "tf32") if dtype == torch.float32 else ("ieee",)):
                _, meta = _aot_inputs(cs, ct, dtype, grad_s, grad_t, precision)
                grads = "+".join(name for name, on in (("s", grad_s), ("t", grad_t)) if on) or "none"
                mode = f"grad {grads}, {meta['PRECISION']}{', exact signs' if meta['EXACT_SIGNS'] else ''}"
                for block in gpu_blocks(arch, meta, dtype.itemsize):
                    bi, bj, warps, stages = block
                    cases.append(AotCase(dtype, mode, f"{bi}x{bj}, {warps} warps, {stages} stages",
                                         (dtype, grad_s, grad_t, precision, block)))
    return cases


def aot_launch(cs: int, ct: int, dtype: torch.dtype, grad_s: bool, grad_t: bool, precision: str, block: tuple):
    """(kernel, grid, arguments, keyword arguments) of one autotuning config of that launch."""
    args, meta = _aot_inputs(cs, ct, dtype, grad_s, grad_t, precision)
    bi, bj, warps, stages = block
    batch, n = args[8].shape  # row_loss
    grid = (triton.cdiv(n, bi), batch)
    return _affinity_l1_kernel, grid, args, dict(meta, BLOCK_I=bi, BLOCK_J=bj, num_warps=warps, num_stages=stages)
