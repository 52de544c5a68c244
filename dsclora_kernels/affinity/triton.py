"""Triton kernel of the blockwise spatial-affinity L1 loss (GPU; CPU tensors under TRITON_INTERPRET=1).

One program per (row block I, image b) sweeps all column blocks J, like flash-attention:
``D = x̂_s[:, I]ᵀ x̂_s[:, J] − x̂_t[:, I]ᵀ x̂_t[:, J]`` with ``tl.dot``, ``loss_I += Σ_J |D|``,
``G[:, I] += x̂[:, J] sign(D)ᵀ``. Each program owns its rows of G and of the loss: no atomics,
deterministic. Without gradients, only blocks J ≥ I are visited (D is symmetric). With gradients,
entries closer to a tie than the rounding error (|D| < tie_bound) are recomputed in float64 from
the raw features, in the tiles that have any (tf32x3: in the 16-row chunks of a tile that have
any), so every sign is exact.
Channels are padded to a power of two (≥ 16, the smallest ``tl.dot`` size) inside the kernel.

Precision of the float32 products (``precision``, the ``input_precision`` of ``tl.dot``), on
both products, D's Gram tiles and G = sign(D) x̂ (sign is exact in every input format):
``"tf32x3"`` (default) three TF32 tensor-core products (HMMA on sm_8x, HGMMA on sm_90) on split
operands a = a_big + a_small, fp32 accumulation; exact signs by the tie refinement above, with
the bound of ``prepare.tie_bound``. ``"ieee"`` fp32 FMAs on CUDA cores (≈ 7x slower on an
H100), exact signs likewise. ``"tf32"`` one TF32 product (u = 2⁻¹¹): each S and T entry is off
by up to ≈ 2⁻¹⁰ whatever C (Cauchy-Schwarz on unit vectors), so signs of entries with |D| below
≈ 2e-3 may flip and are not refined (the bound would cover ~1 % of entries, i.e. nearly every
tile): fastest, for when the gradient may be approximate. The interpreter computes every mode
in exact fp32 (no TF32 emulation); tests/test_affinity.py checks the tf32x3 error model.
"""

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

#: Row block under the interpreter; its column block is half of it, so the rectangular-tile logic
#: is what CI tests.
INTERPRETER_BLOCK = 64

#: Launch configuration (BLOCK_I, BLOCK_J, num_warps, num_stages) per kind of product and compute
#: capability (None: every other one), chosen with triton_budget so that no launch spills and
#: shared memory fits (tests/test_triton_budget.py checks each). A fixed table, no runtime
#: autotuning: its benchmark buffers cost the first call 270 MB on an H200 (issue 19).
#: sm_90 compiles tf32 products to warpgroup MMAs (HGMMA) with fewer registers, so it takes 128-row
#: blocks; sm_8x (HMMA) needs 64-row blocks (sm_86 / sm_89: 16-column blocks and 4 warps).
SMALL_BLOCK = (32, 32, 8, 2)
#: Rows of a tile the tf32x3 kernel recomputes at once where a tile holds ties (the expected
#: refinement work per entry scales with rows x BLOCK_J; 16 is the smallest tl.dot-friendly size).
REFINE_ROWS = 16
LAUNCH_BLOCKS = {
    "tf32x3": {90: (128, 32, 8, 2), 86: (64, 16, 4, 2), 89: (64, 16, 4, 2), None: (64, 32, 8, 2)},
    "tf32": {90: (128, 64, 8, 2), None: (64, 32, 8, 2)},
    "ieee": {None: SMALL_BLOCK},
    "fp64": {None: SMALL_BLOCK},
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


def launch_block(arch: gpu_arch.Arch, meta: dict, itemsize: int) -> tuple:
    """The block of a launch on ``arch``: LAUNCH_BLOCKS' entry for its product if its
    ``shared_bound`` fits the architecture, else SMALL_BLOCK (tests/test_triton_budget.py
    checks it fits)."""
    table = LAUNCH_BLOCKS["fp64" if itemsize == 8 else meta["PRECISION"]]
    block = table.get(arch.capability, table[None])
    return block if shared_bound(block, meta, itemsize) <= arch.smem_per_block else SMALL_BLOCK


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

    @triton.jit
    def _refine_ties(d, tie, FS, FT, RS, RT, CS, CT, N, row0, cols, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                     CHUNK: tl.constexpr):
        """d (BLOCK_I, BLOCK_J) with its tied entries replaced by float64 values, recomputed CHUNK
        rows at a time and only for the chunks holding a tie (the expected work of the refinement
        shrinks with the chunk, not the tile)."""
        d3 = tl.reshape(d, (BLOCK_I // CHUNK, CHUNK, BLOCK_J))
        tie3 = tl.reshape(tie, (BLOCK_I // CHUNK, CHUNK, BLOCK_J))
        chunk = tl.arange(0, BLOCK_I // CHUNK)
        for k in tl.static_range(BLOCK_I // CHUNK):
            here = (chunk == k)[:, None, None] & tie3
            if tl.max(tl.max(tl.max(here.to(tl.int32), axis=2), axis=1), axis=0) > 0:
                rows = row0 + k * CHUNK + tl.arange(0, CHUNK)
                exact = _exact_affinity(FS, RS, CS, N, rows, cols, CHUNK, BLOCK_J)
                exact -= _exact_affinity(FT, RT, CT, N, rows, cols, CHUNK, BLOCK_J)
                d3 = tl.where(here, exact.to(d.dtype)[None, :, :], d3)
        return tl.reshape(d3, (BLOCK_I, BLOCK_J))

    # N, CS, CT not specialised: one compiled kernel per configuration whatever the image size
    # (the tiles are compute-bound: x̂ loads without N's divisibility cost little).
    @triton.jit(do_not_specialize=["N", "CS", "CT", "TIE_BOUND"])
    def _affinity_l1_kernel(
        XS, XT, GS, FS, FT, RS, RT, ROW_LOSS, N, CS, CT, TIE_BOUND,
        CS_PAD: tl.constexpr, CT_PAD: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
        GRAD_S: tl.constexpr, PRECISION: tl.constexpr, EXACT_SIGNS: tl.constexpr, REFINE_ROWS: tl.constexpr,
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
        start = 0
        if not GRAD_S:  # from the diagonal square on (BLOCK_I is a multiple of BLOCK_J)
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
                    if PRECISION == "tf32x3":  # in row chunks (the "ieee" kernel would spill with them)
                        d = _refine_ties(d, tie, FS, FT, RS, RT, CS, CT, N, block * BLOCK_I, cols, BLOCK_I, BLOCK_J,
                                         REFINE_ROWS)
                    else:  # the whole tile
                        exact = _exact_affinity(FS, RS, CS, N, rows, cols, BLOCK_I, BLOCK_J)
                        exact -= _exact_affinity(FT, RT, CT, N, rows, cols, BLOCK_I, BLOCK_J)
                        d = tl.where(tie, exact.to(dtype), d)
            if GRAD_S:
                loss += tl.sum(tl.abs(d), axis=1).to(tl.float64)
            else:  # pairs inside the diagonal square once (both orders are in it), the rest twice
                weight = tl.where(cols < (block + 1) * BLOCK_I, 1.0, 2.0).to(dtype)
                loss += tl.sum(tl.abs(d) * weight[None, :], axis=1).to(tl.float64)
            if GRAD_S:  # sign(D) is exact in any input precision; only x̂_s is rounded
                sign = (tl.where(d > 0, 1.0, 0.0) - tl.where(d < 0, 1.0, 0.0)).to(dtype)
                if PRECISION == "tf32x3":  # two TF32 products on x̂ = big + small (error ≤ 2⁻²⁰|x̂|)
                    big = (xs_j.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                    gs = tl.dot(sign, tl.trans(big), gs, input_precision="tf32")
                    gs = tl.dot(sign, tl.trans(xs_j - big), gs, input_precision="tf32")
                else:
                    gs = tl.dot(sign, tl.trans(xs_j), gs, input_precision=PRECISION, out_dtype=dtype)
        tl.store(ROW_LOSS + image * N + rows, loss, mask=row_ok)
        if GRAD_S:
            tl.store(GS + image * CS * N + cs[None, :] * N + rows[:, None], gs, mask=(cs[None, :] < CS) & row_ok[:, None])


def _kernel_call(xs, xt, grad_s: bool, precision: str, tie_bound: float, eps: float):
    """(arguments, constexprs, (row_loss, G_s)) of the kernel launch for ``affinity_l1_triton``."""
    batch, cs, n = xs.xhat.shape
    ct = xt.xhat.shape[1]
    if xs.xhat.dtype == torch.float64:
        precision = "ieee"  # tensor cores have no float64 mode
    gs = torch.empty_like(xs.xhat) if grad_s else xs.xhat.new_empty(1)
    rs, rt = (xs.inverse_norm(eps), xt.inverse_norm(eps)) if tie_bound > 0 else (gs, gs)  # unused unless exact
    row_loss = xs.xhat.new_empty(batch, n, dtype=torch.float64)  # Σ_j |D_ij| per row i
    args = (xs.xhat, xt.xhat, gs, xs.raw, xt.raw, rs, rt, row_loss, n, cs, ct, tie_bound)
    meta = dict(CS_PAD=padded_channels(cs), CT_PAD=padded_channels(ct), GRAD_S=grad_s,
                PRECISION=precision, EXACT_SIGNS=tie_bound > 0)
    return args, meta, (row_loss, gs if grad_s else None)


def _launch(xs, xt, grad_s: bool, precision: str, tie_bound: float, eps: float):
    """One kernel launch: (Σ_ij |D_ij| as a float64 scalar, G_s or None)."""
    args, meta, (row_loss, gs) = _kernel_call(xs, xt, grad_s, precision, tie_bound, eps)
    batch, n = row_loss.shape
    if triton_interpreting():  # two refinement chunks per block: the chunk logic, at the interpreter's pace
        block, refine_rows = (INTERPRETER_BLOCK, INTERPRETER_BLOCK // 2, 4, 2), INTERPRETER_BLOCK // 2
    else:
        block = launch_block(gpu_arch.device_arch(xs.xhat.device)[0], meta, xs.xhat.element_size())
        refine_rows = min(REFINE_ROWS, block[0])
    block_i, block_j, warps, stages = block
    _affinity_l1_kernel[(triton.cdiv(n, block_i), batch)](
        *args, BLOCK_I=block_i, BLOCK_J=block_j, REFINE_ROWS=refine_rows, num_warps=warps, num_stages=stages, **meta)
    _launches.record("affinity_l1")
    return row_loss.sum(), gs


def affinity_l1_triton(xs, xt, grad_s: bool, grad_t: bool, precision: str, tie_bound: float, eps: float):
    """Σ|S − T| (float64 scalar) and G = Σ_j sign(D_ij) x̂_j for student / teacher (or None).

    xs, xt: prepared inputs (``prepare.Normalised``: x̂ (B, C, N) contiguous, raw F, norms).
    With tie_bound > 0, entries with |D| < tie_bound are recomputed in float64 (exact signs).
    The kernel computes the student's G only: the teacher's is the student G of the swapped pair
    (Σ|S − T| is symmetric and sign(T − S) = −sign(S − T)), a second launch when both are wanted
    (not in training, where the teacher is a constant; one G per launch keeps it free of spills).
    """
    if grad_t and not grad_s:
        total, g = _launch(xt, xs, True, precision, tie_bound, eps)
        return total, None, g.neg_()
    total, gs = _launch(xs, xt, grad_s, precision, tie_bound, eps)
    gt = _launch(xt, xs, True, precision, tie_bound, eps)[1].neg_() if grad_t else None
    return total, gs, gt


# ---- the "triton" backend of the affinity loss ----
# (listed as a _dispatch.LazyBackend whose status is triton_support.status: this module is
# imported only once the registry chooses it)


def unsupported(*features: torch.Tensor) -> None:
    return None


def leading_dimension(n: int) -> int:
    return n


def l1_pass(xs: Normalised, xt: Normalised, grad_s: bool, grad_t: bool, precision: str, eps: float):
    """Σ|S − T| and G_s, G_t (or None) with the kernel, signs exact (tie bound) with gradients."""
    bound = tie_bound((xs, xt), precision) if grad_s or grad_t else 0.0
    return affinity_l1_triton(xs, xt, grad_s, grad_t, precision, bound, eps)


# ---- ahead-of-time compilation (triton_budget; triton_support's interface) ----

#: (student, teacher) channels: SPAN-Tiny 26 / SPAN 28 (the paper's pair), 48 / 52.
AOT_CHANNELS = ((26, 28), (48, 52))

#: Register spills tolerated for now (bytes, Triton 3.9), a ratchet: any other spill, or a larger
#: one, is a problem. Open work: 48/52 channels; the training pair 26/28 spills nothing anywhere.
SPILLS_TOLERATED = {
    ("sm_80", "48/52", "grad none, tf32x3"): 136,
    ("sm_80", "48/52", "grad s, tf32x3, exact signs"): 788,
    ("sm_90", "48/52", "grad s, tf32x3, exact signs"): 96,
    ("sm_90", "48/52", "grad s, tf32"): 92,
    **{(arch, "48/52", mode): spill for arch in ("sm_86", "sm_89") for mode, spill in (
        ("grad none, tf32x3", 272), ("grad s, ieee, exact signs", 4), ("grad s, tf32x3, exact signs", 16),
        ("grad s, tf32", 8))},
}


def _aot_inputs(cs: int, ct: int, dtype: torch.dtype, grad_s: bool, precision: str):
    """The launch ``l1_pass`` makes for CUDA features (1, cs|ct, 32, 32) of ``dtype``,
    built on CPU tensors: (arguments, constexprs)."""
    eps = 1e-8
    xs, xt = (normalise(torch.ones(1, c, 32, 32, dtype=dtype), eps, dtype) for c in (cs, ct))
    bound = tie_bound((xs, xt), precision) if grad_s else 0.0  # as l1_pass
    args, meta, _ = _kernel_call(xs, xt, grad_s, precision, bound, eps)
    return args, meta


def aot_cases(arch: gpu_arch.Arch) -> list[triton_support.AotCase]:
    """Every launch on ``arch`` for AOT_CHANNELS: dtypes, with or without the student gradient (a
    teacher gradient is the student gradient of the swapped pair), precisions. TF32 products must
    run on tensor cores; no launch may spill beyond SPILLS_TOLERATED."""
    from . import PRECISIONS  # the package, initialised by then

    cases = []
    for cs, ct in AOT_CHANNELS:
        for dtype in (torch.float32, torch.float64):
            for grad_s in (False, True):
                for precision in (PRECISIONS if dtype == torch.float32 else ("ieee",)):
                    _, meta = _aot_inputs(cs, ct, dtype, grad_s, precision)
                    mode = f"grad {'s' if grad_s else 'none'}, {meta['PRECISION']}"
                    mode += ", exact signs" if meta["EXACT_SIGNS"] else ""
                    bi, bj, warps, stages = block = launch_block(arch, meta, dtype.itemsize)
                    channels = f"{cs}/{ct}"
                    cases.append(triton_support.AotCase(
                        "affinity", str(dtype)[6:], channels, mode, f"{bi}x{bj}, {warps} warps, {stages} stages",
                        arch.name, (cs, ct, dtype, grad_s, precision, block),
                        spills_tolerated=SPILLS_TOLERATED.get((arch.name, channels, mode), 0),
                        needs_tensor_cores="tf32" in meta["PRECISION"]))
    return cases


def aot_launch(arch: gpu_arch.Arch, cs: int, ct: int, dtype: torch.dtype, grad_s: bool, precision: str,
               block: tuple) -> triton_support.AotLaunch:
    """One launch of ``aot_cases`` (its block already chosen for ``arch``), built on CPU tensors."""
    args, meta = _aot_inputs(cs, ct, dtype, grad_s, precision)
    bi, bj, warps, stages = block
    batch, n = args[7].shape  # row_loss
    grid = (triton.cdiv(n, bi), batch)
    meta = dict(meta, BLOCK_I=bi, BLOCK_J=bj, REFINE_ROWS=min(REFINE_ROWS, bi), num_warps=warps, num_stages=stages)
    return triton_support.AotLaunch(_affinity_l1_kernel, grid, args, meta, None)
