"""The SPAB block in plain PyTorch (SPEC §2): the specification of the fused ``spab`` op,
and its ``"reference"`` backend (the convolutions' gradients, PyTorch's / cuDNN's, also serve
the Triton backend).

Weights are in eval form: 3x3 convolutions with padding 1, w (C, C, 3, 3), b (C,).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "reference"
WEIGHT_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")


def spab_reference(x, w1, b1, w2, b2, w3, b3) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> (out, h1), both (B, C, H, W).

    h1 = silu(conv(x, w1)); h2 = silu(conv(h1, w2)); o3 = conv(h2, w3);
    out = (o3 + x) * (sigmoid(o3) - 0.5). h1 is returned post-activation (SPEC §2 quirk).
    """
    h1 = F.silu(F.conv2d(x, w1, b1, padding=1))
    h2 = F.silu(F.conv2d(h1, w2, b2, padding=1))
    o3 = F.conv2d(h2, w3, b3, padding=1)
    return (o3 + x) * (torch.sigmoid(o3) - 0.5), h1


def spab_recompute_reference(x, g_out, w1, b1, w2, b2, w3, b3) -> tuple[torch.Tensor, ...]:
    """What the backward of ``spab`` recomputes from the block input x and dL/dout.

    Returns (h1, h2, d1, d2, g_o3, g_xres), all (B, C, H, W), with a_i the pre-activations
    (h_i = silu(a_i)), s = sigmoid(o3):
    d_i = silu'(a_i) = sigmoid(a_i) (1 + a_i (1 - sigmoid(a_i))),
    g_o3 = dL/do3 = g_out ((s - 0.5) + (o3 + x) s (1 - s)), g_xres = g_out (s - 0.5)
    (the residual's share of dL/dx).
    """
    def silu_and_grad(a):
        s = torch.sigmoid(a)
        return a * s, s * (1 + a * (1 - s))

    h1, d1 = silu_and_grad(F.conv2d(x, w1, b1, padding=1))
    h2, d2 = silu_and_grad(F.conv2d(h1, w2, b2, padding=1))
    o3 = F.conv2d(h2, w3, b3, padding=1)
    s = torch.sigmoid(o3)
    g_xres = g_out * (s - 0.5)
    g_o3 = g_xres + g_out * (o3 + x) * s * (1 - s)
    return h1, h2, d1, d2, g_o3, g_xres


# ---- the "reference" backend ----

def status(device: torch.device) -> str:
    return "available"


def unsupported(x: Tensor) -> None:
    return None


def forward(x: Tensor, weights: tuple[Tensor, ...], out: Tensor, h1: Tensor) -> None:
    """Fill out and h1 (both like x) with ``spab_reference``."""
    ref_out, ref_h1 = spab_reference(x, *weights)
    out.copy_(ref_out)
    h1.copy_(ref_h1)


def recompute(x: Tensor, g_out: Tensor, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return spab_recompute_reference(x, g_out, *weights)


def input_grad(grad: Tensor, inp: Tensor, w: Tensor, add: Optional[Tensor] = None,
               mul: Optional[Tensor] = None) -> Tensor:
    """(dL/dinp + add) * mul for conv2d(inp, w, padding=1) given grad = dL/doutput."""
    g_inp = conv_backward(grad, inp, w, (True, False, False))[0]
    if add is not None:
        g_inp.add_(add)
    return g_inp if mul is None else g_inp.mul_(mul)


def weight_grads(grad: Tensor, inp: Tensor, w: Tensor, need_w: bool, need_b: bool):
    """(dL/dw, dL/db) of conv2d(inp, w, b, padding=1) given grad = dL/doutput (None if not needed)."""
    return conv_backward(grad, inp, w, (False, need_w, need_b))[1:]


def conv_backward(grad: Tensor, inp: Tensor, w: Tensor, mask: tuple[bool, bool, bool]):
    """(dL/dinp, dL/dw, dL/db) of conv2d(inp, w, b, padding=1) given dL/doutput (None where not in mask)."""
    return torch.ops.aten.convolution_backward(
        grad, inp, w, [w.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, list(mask)
    )
