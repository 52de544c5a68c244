"""The fused SPAB block as the custom op ``dsclora::spab`` (SPEC §2), forward and backward.

``spab(x, w1, b1, w2, b2, w3, b3) -> (out, h1)`` computes ``spab_reference`` in one pass:
C++ (``dsclora_kernels._spab``, float32) on the CPU, Triton (fp16/bf16/fp32) on the GPU,
the PyTorch reference otherwise (logged once). The autograd formula saves only the block
input: the backward op ``dsclora::spab_backward`` recomputes h1, h2, silu'(a1), silu'(a2),
dL/do3 with the same fused kernels; on the CPU the three convolutions' input gradients (with
their pointwise tails) and weight gradients are C++ kernels too, elsewhere PyTorch's
convolution backward (cuDNN) with in-place pointwise ops. Weights are packed per kernel and
cached per weight version.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, triton_support
from . import cpu, reference
from .reference import WEIGHT_NAMES, spab_reference

#: Backends per device type, fastest first (the reference ends every list).
BACKENDS = _dispatch.Registry("spab", reference, cpu=(cpu,),
                             cuda=(_dispatch.LazyBackend(f"{__name__}.triton", "triton", triton_support.status),))


def _check(x: Tensor, weights: tuple[Tensor, ...]) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"spab: x must be a float (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in zip(WEIGHT_NAMES, weights):
        expected = (c, c, 3, 3) if name[0] == "w" else (c,)
        if tuple(t.shape) != expected:
            raise ValueError(f"spab: {name} must have shape {expected} for C={c}, got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"spab: {name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}"
            )


# ---- forward ----

def spab_forward(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """What ``spab`` computes, called directly: no autograd, no torch.compile support, none of
    the custom-op machinery (whose first call imports torch._dynamo, seconds of a CLI's start).
    For eager inference (``dsclora.infer``); everything else calls ``spab``."""
    weights = (w1, b1, w2, b2, w3, b3)
    _check(x, weights)
    out, h1 = torch.empty_like(x), torch.empty_like(x)
    if x.numel() == 0:
        return out, h1
    BACKENDS.choose(x.device, x).forward(x, weights, out, h1)
    return out, h1


@torch.library.custom_op("dsclora::spab", mutates_args=())
def spab(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor) -> tuple[Tensor, Tensor]:
    """SPAB block, x (B, C, H, W) -> (out, h1), both (B, C, H, W) in x's memory layout.

    Weights in eval form: w_i (C, C, 3, 3), b_i (C,), padding 1; exactly ``spab_reference``.
    """
    return spab_forward(x, w1, b1, w2, b2, w3, b3)


@spab.register_fake
def _(x, w1, b1, w2, b2, w3, b3):
    _check(x, (w1, b1, w2, b2, w3, b3))
    return torch.empty_like(x), torch.empty_like(x)


# ---- backward ----

def _weight_grads(backend, grad: Tensor, inp: Tensor, w: Tensor, need_w: bool, need_b: bool):
    """(dL/dw, dL/db) of conv2d(inp, w, b, padding=1) given grad = dL/doutput (None if not needed)."""
    if not (need_w or need_b):
        return None, None
    return backend.weight_grads(grad, inp, w, need_w, need_b)


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """t with the strides of ``torch.empty_like(ref)`` (what the fake kernel promises)."""
    target = torch.empty_like(ref)
    return t if t.stride() == target.stride() else target.copy_(t)


@torch.library.custom_op("dsclora::spab_backward", mutates_args=())
def spab_backward(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
    g_out: Tensor, g_h1: Optional[Tensor], needs: list[bool],
) -> list[Tensor]:
    """Gradients of ``spab`` w.r.t. (x, w1, b1, w2, b2, w3, b3) given dL/dout and dL/dh1
    (None: h1 unused); only those flagged in ``needs`` (7 bools) are computed and returned.

    With a2, h2 = silu(a2), o3 the second and third convolutions' outputs:
    dL/da2 = convT(dL/do3, w3) * silu'(a2), dL/da1 = (convT(dL/da2, w2) + dL/dh1) * silu'(a1),
    dL/dx = convT(dL/da1, w1) + g_xres; the weight gradients correlate each dL/da with the
    convolution's input.
    """
    weights = (w1, b1, w2, b2, w3, b3)
    backend = BACKENDS.choose(x.device, x)
    h1, h2, d1, d2, g_o3, g_xres = backend.recompute(x, g_out, weights)
    g_a2 = backend.input_grad(g_o3, h2, w3, mul=d2)
    g_w3, g_b3 = _weight_grads(backend, g_o3, h2, w3, needs[5], needs[6])
    del h2, d2, g_o3
    g_a1 = backend.input_grad(g_a2, h1, w2, add=g_h1, mul=d1)
    g_w2, g_b2 = _weight_grads(backend, g_a2, h1, w2, needs[3], needs[4])
    del h1, d1, g_a2
    g_x = backend.input_grad(g_a1, x, w1, add=g_xres) if needs[0] else None
    g_w1, g_b1 = _weight_grads(backend, g_a1, x, w1, needs[1], needs[2])
    grads = (g_x, g_w1, g_b1, g_w2, g_b2, g_w3, g_b3)
    return [_like(g, ref) for g, ref, need in zip(grads, (x, *weights), needs) if need]


@spab_backward.register_fake
def _(x, w1, b1, w2, b2, w3, b3, g_out, g_h1, needs):
    return [torch.empty_like(t) for t, need in zip((x, w1, b1, w2, b2, w3, b3), needs) if need]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # only the block input and the weights
    ctx.set_materialize_grads(False)


def _backward(ctx, g_out, g_h1):
    x = ctx.saved_tensors[0]
    needs = list(ctx.needs_input_grad)
    if g_out is None:
        g_out = torch.zeros_like(x)
    grads = iter(spab_backward(*ctx.saved_tensors, g_out, g_h1, needs))
    return tuple(next(grads) if need else None for need in needs)


spab.register_autograd(_backward, setup_context=_setup_context)
