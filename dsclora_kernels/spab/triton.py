"""Triton kernel of the fused SPAB block (GPU; CPU tensors under TRITON_INTERPRET=1).

One program computes a TH x TW tile of output pixels (TH = FRAME_H - 4, TW = FRAME_W - 4) of
one image from a FRAME_H x FRAME_W frame that starts 2 pixels above and left of the tile:
h1 on the whole frame (its 3x3 convolution reads x straight from memory), h2 on frame rows
and columns 1 .. FRAME-2, o3 on the tile. h1 and h2 go to a per-program scratch frame in
global memory (L1/L2 resident), which the next convolution reads at its 9 shifted offsets;
halos are recomputed, never exchanged. Each 3x3 convolution is a loop over its 9 taps, each a
``tl.dot`` of a (ROWS * FRAME_W, C_PAD) pixel panel with a (C_PAD, C_PAD) weight tap; channels
are padded to a power of two >= 16 (padded weights and biases are zero, so padded channels stay
zero). The launch configuration (panel size, warps, pipeline depth, programs per SM) comes from
a table per GPU architecture, dtype and padded width (``launch_config``), checked ahead of time
against each architecture's shared-memory and register budget (``triton_budget``).

``recompute=True`` is the backward's variant: instead of ``out`` it writes the intermediates
h1, h2, silu'(a1), silu'(a2), dL/do3 and the residual's share of dL/dx (see
``reference.spab_recompute_reference``). fp16/bf16 accumulate in fp32; fp32 products
use ``tf32x3`` on the GPU (error ≈ fp32) and exact fp32 under the interpreter, which also
upcasts bf16 (its bf16 ``tl.dot`` is wrong).
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _launches, gpu_arch, triton_support
from ..triton_support import padded_channels
from .reference import input_grad, weight_grads  # noqa: F401 -- the convolutions' gradients: PyTorch's (cuDNN)
from .weight_cache import cached

try:
    import triton
    import triton.language as tl
except ImportError:  # the registry never chooses "triton" without it (triton_support.triton_status)
    triton = None

NAME = "triton"

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest frame side (pixels).
MAX_FRAME = 32


class LaunchConfig(NamedTuple):
    """How ``_spab_kernel`` runs: ``panel`` pixels per ``tl.dot`` panel, frames of MAX_FRAME x
    MAX_FRAME pixels (``small_frames``: as small as the image allows), pipeline depth of the tap
    loop, programs per SM."""

    panel: int
    small_frames: bool
    num_warps: int
    num_stages: int
    programs_per_sm: int


#: Under the interpreter: large panels and small frames (fewer, larger numpy steps), 4 programs.
INTERPRETER = LaunchConfig(panel=256, small_frames=True, num_warps=4, num_stages=1, programs_per_sm=4)
#: Widest padded channel count the GPU table covers.
MAX_CHANNELS = 64

# The GPU table: (architecture, bytes per element, padded channels, mode) -> config, None matching
# any architecture or mode (``launch_config`` takes the most specific entry); chosen with
# triton_budget under Triton 3.6 and 3.9 and checked for every architecture by
# tests/test_triton_budget.py: shared memory within the limit, no fp16/bf16 spills,
# programs_per_sm resident at once (the persistent grid runs in one wave). Two programs of 4 warps
# per SM hide each other's barriers and epilogues (255 registers x 128 threads x 2 fill the
# register file); num_stages - 1 tap panels are prefetched into shared memory (cp.async). The
# 16-bit kernels sit at ptxas's 255-register edge, where the two Triton versions spill on
# different entries: the recompute (four more live tiles) gets 32-pixel panels and a third stage,
# 64 channels on sm_80 / sm_90 one program of 8 warps per SM (fewer values per thread).
_CONFIGS = {
    (None, 2, 32, None): LaunchConfig(panel=64, small_frames=False, num_warps=4, num_stages=2, programs_per_sm=2),
    (None, 2, 32, "recompute"): LaunchConfig(panel=32, small_frames=False, num_warps=4, num_stages=3,
                                             programs_per_sm=2),
    ("sm_90", 2, 32, None): LaunchConfig(panel=64, small_frames=False, num_warps=4, num_stages=3, programs_per_sm=2),
    (None, 2, 64, None): LaunchConfig(panel=32, small_frames=False, num_warps=4, num_stages=2, programs_per_sm=2),
    ("sm_80", 2, 64, "forward"): LaunchConfig(panel=64, small_frames=False, num_warps=8, num_stages=2,
                                              programs_per_sm=1),
    ("sm_80", 2, 64, "recompute"): LaunchConfig(panel=32, small_frames=False, num_warps=8, num_stages=3,
                                                programs_per_sm=1),
    ("sm_90", 2, 64, None): LaunchConfig(panel=32, small_frames=False, num_warps=8, num_stages=1, programs_per_sm=1),
    # fp32 (tf32x3 splits both operands in two) may spill a few dozen bytes
    (None, 4, 32, None): LaunchConfig(panel=64, small_frames=False, num_warps=4, num_stages=3, programs_per_sm=2),
    (None, 4, 64, None): LaunchConfig(panel=32, small_frames=False, num_warps=4, num_stages=2, programs_per_sm=2),
}


def launch_config(arch: gpu_arch.Arch, dtype: torch.dtype, cp: int, recompute: bool) -> LaunchConfig:
    """The configuration for a GPU of budget ``arch``, ``dtype``, ``cp`` <= MAX_CHANNELS padded
    channels and the forward (``recompute=False``) or the backward's recompute pass."""
    if cp > MAX_CHANNELS:
        raise ValueError(f"spab (triton): {cp} padded channels; the GPU launch table covers up to {MAX_CHANNELS}")
    key = (dtype.itemsize, max(cp, 32))
    mode = "recompute" if recompute else "forward"
    for entry in ((arch.name, *key, mode), (arch.name, *key, None), (None, *key, mode)):
        if entry in _CONFIGS:
            return _CONFIGS[entry]
    return _CONFIGS[(None, *key, None)]


def frame(h: int, w: int, config: LaunchConfig) -> tuple[int, int, int]:
    """(FRAME_H, FRAME_W, ROWS) for an h x w image: ROWS * FRAME_W = panel. MAX_FRAME x MAX_FRAME
    frames for every image (one compiled kernel per configuration on the GPU), or with
    ``config.small_frames`` as small as the image allows: FRAME_W a power of two, FRAME_H a
    multiple of ROWS."""
    if not config.small_frames:
        return MAX_FRAME, MAX_FRAME, max(1, config.panel // MAX_FRAME)
    frame_w = min(MAX_FRAME, max(8, triton.next_power_of_2(w + 4)))
    rows = max(1, config.panel // frame_w)
    frame_h = min(triton.cdiv(MAX_FRAME, rows), triton.cdiv(h + 4, rows)) * rows
    return frame_h, frame_w, rows


def pack_weights(w1, b1, w2, b2, w3, b3) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-form weights -> (w (3, 9, C_PAD, C_PAD) [conv, tap, ci, co] in w1's dtype,
    b (3, C_PAD) float32), zero-padded."""
    c = w1.shape[0]
    cp = padded_channels(c)
    w = torch.zeros(3, 9, cp, cp, dtype=w1.dtype, device=w1.device)
    b = torch.zeros(3, cp, dtype=torch.float32, device=w1.device)
    for i, (wi, bi) in enumerate(((w1, b1), (w2, b2), (w3, b3))):
        w[i, :, :c, :c] = wi.detach().permute(2, 3, 1, 0).reshape(9, c, c)
        b[i, :c] = bi.detach()
    return w, b


if triton is not None:

    @triton.jit
    def _conv3x3(acc, src, rows, cols, n_rows, n_cols, s_row, s_col, s_chan, n_chan, w_ptr,
                 CP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """acc (P, CP) += 3x3 convolution of src at pixels (rows, cols) (each (P,)); source
        pixels outside [0, n_rows) x [0, n_cols) and channels >= n_chan read as 0.
        w_ptr: 9 (CP, CP) weight taps [ci, co]."""
        ch = tl.arange(0, CP)
        # A loop, not unrolled: the software pipeliner keeps num_stages - 1 panels in flight in
        # shared memory, where 9 unrolled taps held all their loads in registers (255 + spills).
        for tap in range(9):
            r = rows + (tap // 3 - 1)
            c = cols + (tap % 3 - 1)
            ok = (r >= 0) & (r < n_rows) & (c >= 0) & (c < n_cols)
            a = tl.load(src + (r * s_row + c * s_col)[:, None] + ch[None, :] * s_chan,
                        mask=ok[:, None] & (ch < n_chan)[None, :], other=0.0)
            w = tl.load(w_ptr + tap * CP * CP + ch[:, None] * CP + ch[None, :])
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, w, acc)
        return acc

    @triton.jit
    def _store(ptr, rows, cols, s_row, s_col, s_chan, C, value, mask, CP: tl.constexpr):
        ch = tl.arange(0, CP)
        tl.store(ptr + (rows * s_row + cols * s_col)[:, None] + ch[None, :] * s_chan,
                 value.to(ptr.dtype.element_ty), mask=mask[:, None] & (ch[None, :] < C))

    # Sizes and strides are not specialised (no recompilation per image size or layout): the
    # loads are 3x3-shifted gathers that could not use their divisibility anyway.
    @triton.jit(do_not_specialize=["sxn", "sxc", "sxh", "sxw", "sgn", "sgc", "sgh", "sgw", "son", "soc", "soh", "sow",
                                   "C", "H", "W", "TILES_H", "TILES_W", "N_TILES"])
    def _spab_kernel(
        X, sxn, sxc, sxh, sxw,
        GOUT, sgn, sgc, sgh, sgw,
        OUT, H1, H2, D1, D2, GO3, GXRES, son, soc, soh, sow,
        WP, BP, SCRATCH,
        C, H, W, TILES_H, TILES_W, N_TILES,
        CP: tl.constexpr, FRAME_H: tl.constexpr, FRAME_W: tl.constexpr, ROWS: tl.constexpr,
        RECOMPUTE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        P: tl.constexpr = ROWS * FRAME_W
        FRAME: tl.constexpr = FRAME_H * FRAME_W
        TH: tl.constexpr = FRAME_H - 4
        TW: tl.constexpr = FRAME_W - 4
        # int32 offsets inside one image (the launcher checks they fit), int64 image offsets:
        # half the registers of int64 index tensors
        ch = tl.arange(0, CP)
        p = tl.arange(0, P)
        fj = p % FRAME_W
        scratch1 = SCRATCH + tl.program_id(0).to(tl.int64) * (2 * FRAME * CP)
        scratch2 = scratch1 + FRAME * CP
        for tile in range(tl.program_id(0), N_TILES, tl.num_programs(0)):
            n = (tile // (TILES_H * TILES_W)).to(tl.int64)
            y0 = (tile // TILES_W) % TILES_H * TH - 2  # image row of frame row 0
            x0 = tile % TILES_W * TW - 2
            x_img = X + n * sxn
            o_off = n * son
            x = x0 + fj
            x_inside = (x >= 0) & (x < W)

            # h1 = silu(conv(x, w1)) on the whole frame, zero outside the image
            for r0 in range(0, FRAME_H, ROWS):
                fi = r0 + p // FRAME_W
                y = y0 + fi
                acc = tl.zeros((P, CP), tl.float32)
                acc = _conv3x3(acc, x_img, y, x, H, W, sxh, sxw, sxc, C, WP, CP, DOT_FP32, PRECISION)
                a1 = acc + tl.load(BP + ch)[None, :]
                s1 = tl.sigmoid(a1)
                inside = (y >= 0) & (y < H) & x_inside
                h1 = tl.where(inside[:, None], a1 * s1, 0.0)
                _store(scratch1, fi, fj, FRAME_W * CP, CP, 1, CP, h1, fi < FRAME_H, CP)
                core = inside & (fi >= 2) & (fi < FRAME_H - 2) & (fj >= 2) & (fj < FRAME_W - 2)
                _store(H1 + o_off, y, x, soh, sow, soc, C, h1, core, CP)
                if RECOMPUTE:
                    _store(D1 + o_off, y, x, soh, sow, soc, C, s1 * (1 + a1 * (1 - s1)), core, CP)
            tl.debug_barrier()

            # h2 = silu(conv(h1, w2)) on frame rows/columns 1 .. FRAME-2
            for r0 in range(1, FRAME_H - 1, ROWS):
                fi = r0 + p // FRAME_W
                y = y0 + fi
                acc = tl.zeros((P, CP), tl.float32)
                acc = _conv3x3(acc, scratch1, fi, fj, FRAME_H, FRAME_W, FRAME_W * CP, CP, 1, CP,
                               WP + 9 * CP * CP, CP, DOT_FP32, PRECISION)
                a2 = acc + tl.load(BP + CP + ch)[None, :]
                s2 = tl.sigmoid(a2)
                inside = (y >= 0) & (y < H) & x_inside
                h2 = tl.where(inside[:, None], a2 * s2, 0.0)
                _store(scratch2, fi, fj, FRAME_W * CP, CP, 1, CP, h2, fi < FRAME_H, CP)
                if RECOMPUTE:
                    core = inside & (fi >= 2) & (fi < FRAME_H - 2) & (fj >= 2) & (fj < FRAME_W - 2)
                    _store(H2 + o_off, y, x, soh, sow, soc, C, h2, core, CP)
                    _store(D2 + o_off, y, x, soh, sow, soc, C, s2 * (1 + a2 * (1 - s2)), core, CP)
            tl.debug_barrier()

            # o3 = conv(h2, w3) and the attention on the tile
            for r0 in range(2, FRAME_H - 2, ROWS):
                fi = r0 + p // FRAME_W
                y = y0 + fi
                acc = tl.zeros((P, CP), tl.float32)
                acc = _conv3x3(acc, scratch2, fi, fj, FRAME_H, FRAME_W, FRAME_W * CP, CP, 1, CP,
                               WP + 18 * CP * CP, CP, DOT_FP32, PRECISION)
                o3 = acc + tl.load(BP + 2 * CP + ch)[None, :]
                s3 = tl.sigmoid(o3)
                core = (y < H) & (x < W) & (fi < FRAME_H - 2) & (fj >= 2) & (fj < FRAME_W - 2)
                m = core[:, None] & (ch[None, :] < C)
                xc = tl.load(x_img + (y * sxh + x * sxw)[:, None] + ch[None, :] * sxc, mask=m, other=0.0)
                xc = xc.to(tl.float32)
                attention = s3 - 0.5
                if RECOMPUTE:
                    # dout/do3 = (o3 + x) s3 (1 - s3) + s3 - 0.5, formed before dL/dout is loaded:
                    # two live tiles instead of four (o3, s3, x, g) keep 16-bit sm_90 from spilling
                    d_o3 = (o3 + xc) * s3 * (1 - s3) + attention
                    g = tl.load(GOUT + n * sgn + (y * sgh + x * sgw)[:, None] + ch[None, :] * sgc, mask=m, other=0.0)
                    g = g.to(tl.float32)
                    _store(GO3 + o_off, y, x, soh, sow, soc, C, g * d_o3, core, CP)
                    _store(GXRES + o_off, y, x, soh, sow, soc, C, g * attention, core, CP)
                else:
                    _store(OUT + o_off, y, x, soh, sow, soc, C, (o3 + xc) * attention, core, CP)
            tl.debug_barrier()


def _kernel_call(x, packed, outputs, g_out, config: LaunchConfig, max_programs: int, interpreting: bool):
    """(grid, positional arguments, keyword arguments) of the ``_spab_kernel`` launch for
    ``_launch``'s arguments (see there) under ``config``; allocates the scratch frames."""
    wp, bp = packed
    b, c, h, w = x.shape
    cp = padded_channels(c)
    frame_h, frame_w, rows = frame(h, w, config)
    tiles_h, tiles_w = triton.cdiv(h, frame_h - 4), triton.cdiv(w, frame_w - 4)
    n_tiles = b * tiles_h * tiles_w
    programs = min(n_tiles, max_programs)
    scratch = torch.empty(programs, 2, frame_h * frame_w, cp, dtype=x.dtype, device=x.device)
    recompute = g_out is not None
    ref = outputs[0] if outputs[0] is not None else outputs[1]
    if any(t is not None and t.stride() != ref.stride() for t in outputs):
        raise ValueError("spab (triton): all outputs must share one memory layout")
    g = g_out if recompute else x
    for name, t in (("x", x), ("dL/dout", g), ("outputs", ref)):
        if sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:])) >= 2**31:
            raise ValueError(f"spab (triton): one image of {name} {tuple(t.shape)} with strides {t.stride()} "
                             "spans 2**31 elements or more (the kernel's offsets within an image are int32)")
    args = (x, *x.stride(), g, *g.stride(), *[t if t is not None else ref for t in outputs], *ref.stride(),
            wp, bp, scratch, c, h, w, tiles_h, tiles_w, n_tiles)
    meta = dict(CP=cp, FRAME_H=frame_h, FRAME_W=frame_w, ROWS=rows, RECOMPUTE=recompute,
                DOT_FP32=x.dtype == torch.float32 or (interpreting and x.dtype == torch.bfloat16),
                PRECISION="ieee" if interpreting else "tf32x3",
                num_warps=config.num_warps, num_stages=config.num_stages)
    return (programs,), args, meta


def _launch(x, packed, outputs, g_out=None):
    """Run the kernel: outputs = (out,) + 6 unused, or the 6 recompute outputs + out=None.
    The configuration: the GPU table's entry for the device, or ``INTERPRETER`` on CPU tensors."""
    interpreting = x.device.type != "cuda"
    if interpreting:
        config, max_programs = INTERPRETER, INTERPRETER.programs_per_sm
    else:
        arch, sms = gpu_arch.device_arch(x.device)
        config = launch_config(arch, x.dtype, padded_channels(x.shape[1]), g_out is not None)
        max_programs = config.programs_per_sm * sms  # persistent: all resident at once
    grid, args, meta = _kernel_call(x, packed, outputs, g_out, config, max_programs, interpreting)
    _spab_kernel[grid](*args, **meta)
    _launches.record("spab.recompute" if g_out is not None else "spab.forward")


# ---- the "triton" backend of spab ----
# (listed as a _dispatch.LazyBackend whose status is triton_support.status: this module is
# imported only once the registry chooses it)


def unsupported(x: Tensor) -> Optional[tuple[str, str]]:
    if x.dtype not in DTYPES:
        return str(x.dtype), f"the Triton kernel supports {DTYPES}; using the PyTorch reference"
    if x.is_cuda and padded_channels(x.shape[1]) > MAX_CHANNELS:
        return f"C={x.shape[1]}", f"the GPU launch table covers up to {MAX_CHANNELS} channels; using the PyTorch reference"
    return None


def forward(x: Tensor, weights: tuple[Tensor, ...], out: Tensor, h1: Tensor) -> None:
    """Fill out and h1 (both like x) with the block's outputs."""
    _launch(x, cached(weights, "triton", pack_weights), (out, h1, None, None, None, None, None))


def recompute(x: Tensor, g_out: Tensor, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The six backward intermediates (h1, h2, d1, d2, g_o3, g_xres; all like x) from x and dL/dout."""
    outputs = tuple(torch.empty_like(x) for _ in range(6))
    _launch(x, cached(weights, "triton", pack_weights), (None, *outputs), g_out=g_out)
    return outputs


# ---- ahead-of-time compilation (triton_budget; triton_support's interface) ----

#: SPAN's channel widths: 26 / 28 pad to 32 channels, 48 / 52 to 64.
AOT_CHANNELS = (26, 48)


def aot_cases(arch: gpu_arch.Arch) -> list[triton_support.AotCase]:
    """Every launch on ``arch``: dtypes x AOT_CHANNELS x forward / recompute. Each must use tensor
    cores; 16-bit launches must not spill (fp32's tf32x3 doubles the live operands and may)."""
    cases = []
    for dtype in DTYPES:
        for channels in AOT_CHANNELS:
            for recompute in (False, True):
                config = launch_config(arch, dtype, padded_channels(channels), recompute)
                described = (f"panel {config.panel}, {config.num_warps} warps, {config.num_stages} stages, "
                             f"{config.programs_per_sm}/SM")
                cases.append(triton_support.AotCase(
                    "spab", str(dtype)[6:], str(channels), "recompute" if recompute else "forward", described,
                    arch.name, (dtype, channels, recompute),
                    spills_tolerated=None if dtype == torch.float32 else 0, needs_tensor_cores=True))
    return cases


def aot_launch(arch: gpu_arch.Arch, dtype: torch.dtype, channels: int, recompute: bool) -> triton_support.AotLaunch:
    """The launch ``_launch`` makes for a CUDA (1, channels, 64, 64) NCHW input on ``arch`` (one
    program), built on CPU tensors."""
    x = torch.zeros(1, channels, 64, 64, dtype=dtype)
    cp = padded_channels(channels)
    packed = torch.zeros(3, 9, cp, cp, dtype=dtype), torch.zeros(3, cp)
    outputs = (None,) + tuple(torch.empty_like(x) for _ in range(6))
    if not recompute:
        outputs = outputs[1:3] + (None,) * 5
    config = launch_config(arch, dtype, cp, recompute)
    grid, args, meta = _kernel_call(x, packed, outputs, torch.zeros_like(x) if recompute else None, config, 1, False)
    return triton_support.AotLaunch(_spab_kernel, grid, args, meta, config.programs_per_sm)
