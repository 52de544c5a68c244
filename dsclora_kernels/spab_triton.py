"""Triton kernel of the fused SPAB block (GPU; CPU tensors under TRITON_INTERPRET=1).

One program computes a TH x TW tile of output pixels (TH = FRAME_H - 4, TW = FRAME_W - 4) of
one image from a FRAME_H x FRAME_W frame that starts 2 pixels above and left of the tile:
h1 on the whole frame (its 3x3 convolution reads x straight from memory), h2 on frame rows
and columns 1 .. FRAME-2, o3 on the tile. h1 and h2 go to a per-program scratch frame in
global memory (L1/L2 resident), which the next convolution reads at its 9 shifted offsets;
halos are recomputed, never exchanged. Each 3x3 convolution is 9 ``tl.dot`` of a
(ROWS * FRAME_W, C_PAD) pixel panel with a (C_PAD, C_PAD) weight tap; channels are padded
to a power of two >= 16 (padded weights and biases are zero, so padded channels stay zero).

``recompute=True`` is the backward's variant: instead of ``out`` it writes the intermediates
h1, h2, silu'(a1), silu'(a2), dL/do3 and the residual's share of dL/dx (see
``spab_reference.spab_recompute_reference``). fp16/bf16 accumulate in fp32; fp32 products
use ``tf32x3`` on the GPU (error ≈ fp32) and exact fp32 under the interpreter, which also
upcasts bf16 (its bf16 ``tl.dot`` is wrong).
"""
import torch

from ._dispatch import triton_interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # dispatch never chooses "triton" without it (_dispatch.triton_status)
    triton = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest frame side and tl.dot panel height (pixels): on the GPU and under the interpreter.
MAX_FRAME, PANEL, INTERPRETER_PANEL = 32, 128, 256


def frame(h: int, w: int, panel: int) -> tuple[int, int, int]:
    """(FRAME_H, FRAME_W, ROWS) for an h x w image: FRAME_W a power of two <= MAX_FRAME,
    ROWS * FRAME_W = panel, FRAME_H a multiple of ROWS; small images get small frames."""
    frame_w = min(MAX_FRAME, max(8, triton.next_power_of_2(w + 4)))
    rows = max(1, panel // frame_w)
    frame_h = min(triton.cdiv(MAX_FRAME, rows), triton.cdiv(h + 4, rows)) * rows
    return frame_h, frame_w, rows


def padded_channels(c: int) -> int:
    return max(16, triton.next_power_of_2(c))


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
    def _conv3x3(acc, src, rows, cols, n_rows, n_cols, s_row, s_col, chan_off, chan_ok,
                 w_ptr, w_off, CP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """acc (P, CP) += 3x3 convolution of src at pixels (rows, cols) (each (P,)); source
        pixels outside [0, n_rows) x [0, n_cols) and channels where not chan_ok read as 0.
        chan_off: channel offsets of src (CP,); w_off: offsets of a (CP, CP) weight tap."""
        pixels = src + rows[:, None] * s_row + cols[:, None] * s_col + chan_off[None, :]
        for tap in tl.static_range(9):
            r = rows + (tap // 3 - 1)
            c = cols + (tap % 3 - 1)
            ok = (r >= 0) & (r < n_rows) & (c >= 0) & (c < n_cols)
            a = tl.load(pixels + ((tap // 3 - 1) * s_row + (tap % 3 - 1) * s_col),
                        mask=ok[:, None] & chan_ok[None, :], other=0.0)
            w = tl.load(w_ptr + tap * CP * CP + w_off)
            if DOT_FP32:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, w, acc)
        return acc

    @triton.jit
    def _store(ptr, rows, cols, ch, s_row, s_col, s_chan, C, value, mask):
        tl.store(ptr + rows[:, None] * s_row + cols[:, None] * s_col + ch[None, :] * s_chan,
                 value.to(ptr.dtype.element_ty), mask=mask[:, None] & (ch[None, :] < C))

    @triton.jit
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
        # int64 indices: no overflow on large tensors (and no overflow checks in the interpreter)
        ch = tl.arange(0, CP).to(tl.int64)
        p = tl.arange(0, P).to(tl.int64)
        x_chan, all_chan, w_off = ch * sxc, ch < CP, ch[:, None] * CP + ch[None, :]
        scratch1 = SCRATCH + tl.program_id(0).to(tl.int64) * 2 * FRAME * CP
        scratch2 = scratch1 + FRAME * CP
        bias1 = tl.load(BP + ch)
        bias2 = tl.load(BP + CP + ch)
        bias3 = tl.load(BP + 2 * CP + ch)
        for tile in range(tl.program_id(0), N_TILES, tl.num_programs(0)):
            n = tile // (TILES_H * TILES_W)
            y0 = (tile // TILES_W) % TILES_H * TH - 2  # image row of frame row 0
            x0 = tile % TILES_W * TW - 2
            x_img = X + n.to(tl.int64) * sxn
            o_off = n.to(tl.int64) * son

            # h1 = silu(conv(x, w1)) on the whole frame, zero outside the image
            for r0 in range(0, FRAME_H, ROWS):
                fi = r0 + p // FRAME_W
                fj = p % FRAME_W
                y = y0 + fi
                x = x0 + fj
                acc = tl.zeros((P, CP), tl.float32)
                acc = _conv3x3(acc, x_img, y, x, H, W, sxh, sxw, x_chan, ch < C, WP, w_off,
                               CP, DOT_FP32, PRECISION)
                a1 = acc + bias1[None, :]
                s1 = tl.sigmoid(a1)
                inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
                h1 = tl.where(inside[:, None], a1 * s1, 0.0)
                _store(scratch1, fi, fj, ch, FRAME_W * CP, CP, 1, CP, h1, fi < FRAME_H)
                core = inside & (fi >= 2) & (fi < FRAME_H - 2) & (fj >= 2) & (fj < FRAME_W - 2)
                _store(H1 + o_off, y, x, ch, soh, sow, soc, C, h1, core)
                if RECOMPUTE:
                    _store(D1 + o_off, y, x, ch, soh, sow, soc, C, s1 * (1 + a1 * (1 - s1)), core)
            tl.debug_barrier()

            # h2 = silu(conv(h1, w2)) on frame rows/columns 1 .. FRAME-2
            for r0 in range(1, FRAME_H - 1, ROWS):
                fi = r0 + p // FRAME_W
                fj = p % FRAME_W
                y = y0 + fi
                x = x0 + fj
                acc = tl.zeros((P, CP), tl.float32)
                acc = _conv3x3(acc, scratch1, fi, fj, FRAME_H, FRAME_W, FRAME_W * CP, CP, ch, all_chan,
                               WP + 9 * CP * CP, w_off, CP, DOT_FP32, PRECISION)
                a2 = acc + bias2[None, :]
                s2 = tl.sigmoid(a2)
                inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
                h2 = tl.where(inside[:, None], a2 * s2, 0.0)
                _store(scratch2, fi, fj, ch, FRAME_W * CP, CP, 1, CP, h2, fi < FRAME_H)
                if RECOMPUTE:
                    core = inside & (fi >= 2) & (fi < FRAME_H - 2) & (fj >= 2) & (fj < FRAME_W - 2)
                    _store(H2 + o_off, y, x, ch, soh, sow, soc, C, h2, core)
                    _store(D2 + o_off, y, x, ch, soh, sow, soc, C, s2 * (1 + a2 * (1 - s2)), core)
            tl.debug_barrier()

            # o3 = conv(h2, w3) and the attention on the tile
            for r0 in range(2, FRAME_H - 2, ROWS):
                fi = r0 + p // FRAME_W
                fj = p % FRAME_W
                y = y0 + fi
                x = x0 + fj
                acc = tl.zeros((P, CP), tl.float32)
                acc = _conv3x3(acc, scratch2, fi, fj, FRAME_H, FRAME_W, FRAME_W * CP, CP, ch, all_chan,
                               WP + 18 * CP * CP, w_off, CP, DOT_FP32, PRECISION)
                o3 = acc + bias3[None, :]
                s3 = tl.sigmoid(o3)
                core = (y < H) & (x < W) & (fi < FRAME_H - 2) & (fj >= 2) & (fj < FRAME_W - 2)
                m = core[:, None] & (ch[None, :] < C)
                xc = tl.load(x_img + y[:, None] * sxh + x[:, None] * sxw + ch[None, :] * sxc,
                             mask=m, other=0.0).to(tl.float32)
                if RECOMPUTE:
                    g = tl.load(GOUT + n.to(tl.int64) * sgn + y[:, None] * sgh + x[:, None] * sgw
                                + ch[None, :] * sgc, mask=m, other=0.0).to(tl.float32)
                    g_xres = g * (s3 - 0.5)
                    _store(GO3 + o_off, y, x, ch, soh, sow, soc, C,
                           g_xres + g * (o3 + xc) * s3 * (1 - s3), core)
                    _store(GXRES + o_off, y, x, ch, soh, sow, soc, C, g_xres, core)
                else:
                    _store(OUT + o_off, y, x, ch, soh, sow, soc, C, (o3 + xc) * (s3 - 0.5), core)
            tl.debug_barrier()


def _launch(x, packed, outputs, g_out=None):
    """Run the kernel: outputs = (out,) + 6 unused, or the 6 recompute outputs + out=None."""
    wp, bp = packed
    b, c, h, w = x.shape
    cp = padded_channels(c)
    interpreting = triton_interpreting()
    frame_h, frame_w, rows = frame(h, w, INTERPRETER_PANEL if interpreting else PANEL)
    th, tw = frame_h - 4, frame_w - 4
    tiles_h, tiles_w = triton.cdiv(h, th), triton.cdiv(w, tw)
    n_tiles = b * tiles_h * tiles_w
    if x.device.type == "cuda":
        # persistent programs, two per SM: their scratch frames (128 KiB each in fp16) stay in L2
        programs = min(n_tiles, 2 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    else:
        programs = min(n_tiles, 4)
    scratch = torch.empty(programs, 2, frame_h * frame_w, cp, dtype=x.dtype, device=x.device)
    recompute = g_out is not None
    ref = outputs[0] if outputs[0] is not None else outputs[1]
    if any(t is not None and t.stride() != ref.stride() for t in outputs):
        raise ValueError("spab (triton): all outputs must share one memory layout")
    g = g_out if recompute else x
    _spab_kernel[(programs,)](
        x, *x.stride(), g, *g.stride(), *[t if t is not None else ref for t in outputs], *ref.stride(),
        wp, bp, scratch, c, h, w, tiles_h, tiles_w, n_tiles,
        CP=cp, FRAME_H=frame_h, FRAME_W=frame_w, ROWS=rows, RECOMPUTE=recompute,
        DOT_FP32=x.dtype == torch.float32 or (interpreting and x.dtype == torch.bfloat16),
        PRECISION="ieee" if interpreting else "tf32x3", num_warps=4 if cp <= 32 else 8,
    )


def forward(x, packed, out, h1) -> None:
    """Fill out and h1 (both like x) with the block's outputs."""
    _launch(x, packed, (out, h1, None, None, None, None, None))


def recompute(x, g_out, packed, h1, h2, d1, d2, g_o3, g_xres) -> None:
    """Fill the six backward intermediates (all like x) from x and dL/dout."""
    _launch(x, packed, (None, h1, h2, d1, d2, g_o3, g_xres), g_out=g_out)
