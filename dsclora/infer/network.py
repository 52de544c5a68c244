"""The fused inference network: SPAN on merged weights (``FusedSpan``)."""
import torch
import torch.nn.functional as F

import dsclora_kernels

from .merge import MergedSpan, add_border_correction
from .precision import note_cpu_half_precision


class FusedSpan:
    """SPAN forward on a MergedSpan: (B, in, H, W) in [0, 1] -> (B, out, sH, sW), not clamped.

    Runs the blocks with ``spab`` (default: the fused op's computation without the custom-op
    dispatcher, ``dsclora_kernels.spab_forward``: inference needs no autograd) and the
    remaining layers as few plain convs in ``memory_format``: conv_1 (normalisation folded),
    one 3x3 conv for conv_2 + its conv_cat slice, three GEMMs accumulating the rest of
    conv_cat (no concatenation), the upsampler conv and the pixel shuffle. The output is in
    ``memory_format`` too: channels_last by default, where the shuffle copies runs of s * out
    contiguous floats (the upsampler's output channels are reordered once for that).

    In bfloat16, conv_1 reads the input and computes in float32 (``input_dtype``): bf16's 8
    significant bits do not hold an 8-bit image's levels, and rounding them cost ~4 dB of PSNR
    against the float32 output on Set14 for 0.5 % of the FLOPs (bench/bf16_quality.py).
    """

    def __init__(self, merged: MergedSpan, device="cpu", dtype=torch.float32,
                 memory_format=torch.channels_last, spab=None):
        self.merged = merged.to(device, dtype)
        self.scale, self.device, self.dtype = merged.scale, torch.device(device), dtype
        self.input_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        self.conv_1 = tuple(t.to(device, self.input_dtype) for t in merged.conv_1)
        self.conv_1_border = {k: t.to(device, self.input_dtype) for k, t in merged.conv_1_border.items()}
        self.memory_format = memory_format
        self.spab = spab or dsclora_kernels.spab_forward
        self.upsampler = subpixel_major(self.merged.upsampler, self.scale)
        if self.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            note_cpu_half_precision(dtype)

    @torch.no_grad()  # not inference_mode: callers get ordinary tensors they may modify
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.input_dtype).contiguous(memory_format=self.memory_format)
        cat = self._conv_cat(x)  # the block features are freed before the upsampler runs
        y = F.conv2d(cat.contiguous(memory_format=self.memory_format), *self.upsampler, padding=1)
        del cat
        return pixel_shuffle(y, self.scale, self.memory_format)

    def _conv_cat(self, x: torch.Tensor) -> torch.Tensor:
        """conv_cat(cat([F0, conv_2(F6), F1, G6])), (B, Cc, H, W) channels_last."""
        m = self.merged
        f0 = add_border_correction(F.conv2d(x, *self.conv_1, padding=1), self.conv_1_border).to(self.dtype)
        h = f0
        for i, weights in enumerate(m.blocks):
            h, h1 = self.spab(h, *weights)
            if i == 0:
                f1 = h
        rows = _pixels(F.conv2d(h, *m.tail, padding=1))
        for feature, weight in zip((f0, f1, h1), m.cat_rest):
            rows.addmm_(_pixels(feature), weight)
        b, _, height, width = x.shape
        return rows.view(b, height, width, -1).permute(0, 3, 1, 2)


def subpixel_major(upsampler: tuple[torch.Tensor, torch.Tensor], s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The upsampler conv's (weight (out*s*s, Cc, 3, 3), bias) with its output channels reordered
    from nn.PixelShuffle's (c, i, j) to (i, j, c): channel (i*s + j)*out + c is sub-pixel (i, j)
    of colour c, so each (i, j) holds the out colours of one output pixel next to each other."""
    weight, bias = upsampler
    out = weight.shape[0] // (s * s)
    order = torch.arange(weight.shape[0], device=weight.device).view(out, s, s).permute(1, 2, 0).reshape(-1)
    return weight[order].contiguous(), bias[order].contiguous()


def pixel_shuffle(y: torch.Tensor, s: int, memory_format=torch.channels_last) -> torch.Tensor:
    """The pixel shuffle of ``subpixel_major`` channels as one copy into ``memory_format``:
    (B, s*s*out, H, W) -> (B, out, sH, sW), out[:, c, s*h + i, s*w + j] = y[:, (i*s + j)*out + c, h, w].

    Channels-last y into a channels-last result copies runs of s * out contiguous floats (for
    each output row, the (j, c) of one LR pixel): on the CPU ~1.9x faster than the same copy
    from PixelShuffle's channel order, itself ~3x faster than F.pixel_shuffle(...).contiguous().
    """
    b, _, h, w = y.shape
    if memory_format == torch.channels_last:
        pixels = y.permute(0, 2, 3, 1).reshape(b, h, w, s, s, -1)  # (b, h, w, i, j, c)
        out = pixels.permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, -1).permute(0, 3, 1, 2)
    else:
        planes = y.reshape(b, s, s, -1, h, w)  # (b, i, j, c, h, w)
        out = planes.permute(0, 3, 4, 1, 5, 2).reshape(b, -1, h * s, w * s)
    return out.contiguous(memory_format=memory_format)  # a no-op unless reshape returned a view (1x1 input)


def _pixels(t: torch.Tensor) -> torch.Tensor:
    """(B*H*W, C) rows of t (B, C, H, W): a view when t is channels_last, else a copy."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])

