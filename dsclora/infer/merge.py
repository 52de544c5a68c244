"""Fold a SPAN into the plain tensors the fused inference network runs (``merge_span``).

Everything that costs nothing at training time but something at inference time is folded
once, exactly (in float64): Conv3XC branches, ConvLoRA adapters (``dsclora.lora.merge_dsclora``),
the input normalisation ``(x - mean) * img_range`` (into conv_1), and conv_2 (into the slice
of conv_cat that reads it: a 3x3 conv followed by a 1x1 conv is one 3x3 conv).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsclora.models import SPAN, Conv3XC

Tensor = torch.Tensor


@dataclass(frozen=True)
class MergedSpan:
    """A SPAN as plain eval-form tensors (C features, Cc concat channels, scale s).

    conv_1: (C, in, 3, 3), (C,) acting on the [0, 1] input, interior-exact; conv_1_border
        maps (min(H, 3), min(W, 3)) to the (C, ·, ·) correction of the border rows/columns
        (zero padding of the *normalised* input is not zero padding of the raw input).
    blocks: six (w1, b1, w2, b2, w3, b3), each weight (C, C, 3, 3), bias (C,).
    tail: (Cc, C, 3, 3), (Cc,): conv_cat's F6 slice composed with conv_2 (+ both biases).
    cat_rest: (3, C, Cc): conv_cat's (transposed) slices for [F0, F1, G6].
    upsampler: (out * s^2, Cc, 3, 3), (out * s^2,).
    """

    scale: int
    conv_1: tuple[Tensor, Tensor]
    conv_1_border: dict[tuple[int, int], Tensor]
    blocks: tuple[tuple[Tensor, ...], ...]
    tail: tuple[Tensor, Tensor]
    cat_rest: Tensor
    upsampler: tuple[Tensor, Tensor]

    def to(self, device=None, dtype=None) -> "MergedSpan":
        """A copy with every tensor moved/cast (normal tensors even under inference_mode,
        so that the fused ops can cache their packed weights)."""
        with torch.inference_mode(False):
            return self._map(lambda t: t.to(device=device, dtype=dtype, copy=True))

    def _map(self, move) -> "MergedSpan":
        return MergedSpan(
            self.scale,
            tuple(map(move, self.conv_1)),
            {k: move(v) for k, v in self.conv_1_border.items()},
            tuple(tuple(map(move, b)) for b in self.blocks),
            tuple(map(move, self.tail)),
            move(self.cat_rest),
            tuple(map(move, self.upsampler)),
        )


def conv_params(conv: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) a plain conv or a Conv3XC (its eval form) applies now."""
    return conv.weight_and_bias() if isinstance(conv, Conv3XC) else (conv.weight, conv.bias)


@torch.no_grad()
def merge_span(model: SPAN) -> MergedSpan:
    """The MergedSpan of ``model`` (not modified), in float64 on the CPU."""
    if any(hasattr(m, "effective_weight") for m in model.modules()):
        from dsclora.lora import merge_dsclora  # ConvLoRA adapters: merged into a plain copy

        model = merge_dsclora(model)
    f64 = lambda pair: tuple(t.detach().double().cpu() for t in pair)  # noqa: E731
    c = model.feature_channels
    w1, b1 = f64(conv_params(model.conv_1))
    mean = model.mean.detach().double().cpu().reshape(-1)
    conv_1, border = fold_normalisation(w1, b1, mean, float(model.img_range))
    blocks = tuple(
        sum((f64(conv_params(conv)) for conv in (blk.c1_r, blk.c2_r, blk.c3_r)), ())
        for blk in model.blocks
    )
    w_cat, b_cat = f64(conv_params(model.conv_cat))
    w_cat = w_cat[:, :, 0, 0]  # (Cc, 4C) acting on cat([F0, conv_2(F6), F1, G6])
    w2, b2 = f64(conv_params(model.conv_2))
    w_cat_h = w_cat[:, c:2 * c]
    tail = (torch.einsum("dc,cihw->dihw", w_cat_h, w2), b_cat + w_cat_h @ b2)
    cat_rest = torch.stack([w_cat[:, :c].T, w_cat[:, 2 * c:3 * c].T, w_cat[:, 3 * c:].T])
    return MergedSpan(
        model.upscale, conv_1, border, blocks, tail, cat_rest.contiguous(),
        f64(conv_params(model.upsampler[0])),
    )


def fold_normalisation(weight: Tensor, bias: Tensor, mean: Tensor, img_range: float):
    """Fold ``conv(pad0((x - mean) * img_range))`` into ``conv(pad0(x))`` + border correction.

    Returns ((W', b'), border): W' = img_range * W and b' = b - img_range * Σ W·mean are exact
    away from the border. At the border the reference pads the *normalised* input with 0,
    i.e. the raw input with ``mean``; ``border[(hs, ws)]`` (C, hs, ws) is the correction for an
    image with min(H, 3) = hs, min(W, 3) = ws, indexed by position class (first/inner/last).
    """
    w = weight * img_range
    b = bias - torch.einsum("cihw,i->c", w, mean)
    border = {}
    for hs in (1, 2, 3):
        for ws in (1, 2, 3):
            # x = 0 everywhere: the reference sees -mean*img_range inside and 0 outside.
            constant = (-mean * img_range).view(1, -1, 1, 1).expand(1, -1, hs, ws)
            reference = F.conv2d(constant, weight, bias, padding=1)[0]
            border[(hs, ws)] = reference - b.view(-1, 1, 1)
    return (w, b), border


def _regions(n: int) -> list[tuple[int, slice, bool]]:
    """(position class, slice, is_inner) of the first, inner and last of n rows/columns."""
    if n <= 2:
        return [(i, slice(i, i + 1), False) for i in range(n)]
    return [(0, slice(0, 1), False), (1, slice(1, n - 1), True), (2, slice(n - 1, n), False)]


def add_border_correction(y: Tensor, border: dict[tuple[int, int], Tensor]) -> Tensor:
    """Add conv_1's border correction to y (B, C, H, W) in place; the interior is untouched."""
    h, w = y.shape[-2:]
    delta = border[(min(h, 3), min(w, 3))]
    for rc, rows, row_inner in _regions(h):
        for cc, cols, col_inner in _regions(w):
            if not (row_inner and col_inner):
                y[:, :, rows, cols] += delta[:, rc, cc].view(-1, 1, 1)
    return y
