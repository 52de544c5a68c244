"""The SPAB block in plain PyTorch (SPEC §2): the specification of the fused ``spab`` op.

Weights are in eval form: 3x3 convolutions with padding 1, w (C, C, 3, 3), b (C,).
"""
import torch
import torch.nn.functional as F


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
