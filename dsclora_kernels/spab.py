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
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _dispatch, _native, spab_triton
from ._log import fallback
from .spab_reference import spab_recompute_reference, spab_reference

_WEIGHT_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")


def _check(x: Tensor, weights: tuple[Tensor, ...]) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"spab: x must be a float (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in zip(_WEIGHT_NAMES, weights):
        expected = (c, c, 3, 3) if name[0] == "w" else (c,)
        if tuple(t.shape) != expected:
            raise ValueError(f"spab: {name} must have shape {expected} for C={c}, got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"spab: {name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}"
            )


def _backend(x: Tensor) -> str:
    backend = _dispatch.choose("spab", "spab", x.device)
    if backend == "cpp" and x.dtype != torch.float32:
        fallback(f"spab:cpp:{x.dtype}", "the C++ kernel computes in float32 only; using the PyTorch reference")
        return "reference"
    if backend == "triton" and x.dtype not in spab_triton.DTYPES:
        fallback(f"spab:triton:{x.dtype}",
                 f"the Triton kernel supports {spab_triton.DTYPES}; using the PyTorch reference")
        return "reference"
    if backend == "triton" and x.is_cuda and spab_triton.padded_channels(x.shape[1]) > spab_triton.MAX_CHANNELS:
        fallback(f"spab:triton:C={x.shape[1]}", f"the GPU launch table covers up to {spab_triton.MAX_CHANNELS} "
                 "channels; using the PyTorch reference")
        return "reference"
    return backend


# ---- packed weights, cached per (tensor, version) ----

_PACKED: dict = {}


def _cached(tensors: tuple[Tensor, ...], kind: str, pack: Callable):
    """pack(*tensors), reused while every tensor is alive and unmodified (same ``_version``).
    Inference tensors have no version counter: they are packed on every call."""
    if any(t.is_inference() for t in tensors):
        return pack(*tensors)
    key = (kind, *(id(t) for t in tensors))
    versions = tuple(t._version for t in tensors)
    entry = _PACKED.get(key)
    if entry is not None and entry[1] == versions and all(r() is t for r, t in zip(entry[0], tensors)):
        return entry[2]
    with torch.no_grad():
        packed = pack(*tensors)
    drop = lambda _ref, key=key: _PACKED.pop(key, None)  # noqa: E731 -- forget dead weights
    _PACKED[key] = (tuple(weakref.ref(t, drop) for t in tensors), versions, packed)
    return packed


def _arg(t: Optional[Tensor], name: str, layout: str = "strided"):
    """t as an argument of the C++ kernels: float32 CPU memory, checked (None stays None)."""
    return _native.tensor(t, f"spab: {name}", torch.float32, layout)


def _pack_cpu(*weights: Tensor, isa: str) -> tuple[Tensor, ...]:
    """(w1, b1, ...) -> (w1 in the C++ kernel's layout for ``isa``, b1, ...), float32."""
    packed = []
    for t in weights:
        t = t.detach().contiguous()
        if t.dim() == 4:
            out = torch.empty(t.numel(), dtype=torch.float32)
            _native.call("spab", "pack", _arg(t, "w", "contiguous"), _arg(out, "packed w"), isa=isa)
            t = out
        packed.append(t)
    return tuple(packed)


def _cpp(weights: tuple[Tensor, ...]) -> tuple[str, list]:
    """(ISA, the weights packed for it as kernel arguments)."""
    isa = _native.isa("spab")
    packed = _cached(weights, f"cpu:{isa}", lambda *w: _pack_cpu(*w, isa=isa))
    return isa, [_arg(p, name) for p, name in zip(packed, _WEIGHT_NAMES)]


# ---- forward ----

@torch.library.custom_op("dsclora::spab", mutates_args=())
def spab(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor) -> tuple[Tensor, Tensor]:
    """SPAB block, x (B, C, H, W) -> (out, h1), both (B, C, H, W) in x's memory layout.

    Weights in eval form: w_i (C, C, 3, 3), b_i (C,), padding 1; exactly ``spab_reference``.
    """
    weights = (w1, b1, w2, b2, w3, b3)
    _check(x, weights)
    out, h1 = torch.empty_like(x), torch.empty_like(x)
    if x.numel() == 0:
        return out, h1
    backend = _backend(x)
    if backend == "cpp":
        isa, packed = _cpp(weights)
        _native.call("spab", "forward", _arg(x, "x"), _arg(out, "out"), _arg(h1, "h1"), packed,
                     threads=torch.get_num_threads(), isa=isa)
    elif backend == "triton":
        spab_triton.forward(x, _cached(weights, "triton", spab_triton.pack_weights), out, h1)
    else:
        ref_out, ref_h1 = spab_reference(x, *weights)
        out.copy_(ref_out)
        h1.copy_(ref_h1)
    return out, h1


@spab.register_fake
def _(x, w1, b1, w2, b2, w3, b3):
    _check(x, (w1, b1, w2, b2, w3, b3))
    return torch.empty_like(x), torch.empty_like(x)


# ---- backward ----

def _recompute(x: Tensor, g_out: Tensor, weights: tuple[Tensor, ...], backend: str) -> tuple[Tensor, ...]:
    """(h1, h2, d1, d2, g_o3, g_xres) of ``spab_recompute_reference``, fused where possible."""
    if backend == "reference":
        return spab_recompute_reference(x, g_out, *weights)
    outputs = tuple(torch.empty_like(x) for _ in range(6))
    if backend == "cpp":
        isa, packed = _cpp(weights)
        names = ("h1", "h2", "d1", "d2", "g_o3", "g_xres")
        _native.call("spab", "recompute", _arg(x, "x"), _arg(g_out, "g_out"),
                     [_arg(t, name) for t, name in zip(outputs, names)], packed,
                     threads=torch.get_num_threads(), isa=isa)
    else:
        spab_triton.recompute(x, g_out, _cached(weights, "triton", spab_triton.pack_weights), *outputs)
    return outputs


def _pack_cpu_transposed(w: Tensor, isa: str) -> tuple[Tensor, Tensor]:
    """The weight whose convolution is the input gradient of conv(., w) (channels swapped,
    taps flipped), packed for the C++ kernel on ``isa``, and a zero bias."""
    return _pack_cpu(w.transpose(0, 1).flip(2, 3), isa=isa)[0], torch.zeros(w.shape[0])


def _input_grad(grad: Tensor, inp: Tensor, w: Tensor, backend: str,
                add: Optional[Tensor] = None, mul: Optional[Tensor] = None) -> Tensor:
    """(dL/dinp + add) * mul for conv2d(inp, w, padding=1) given grad = dL/doutput."""
    if backend == "cpp":
        isa = _native.isa("spab")
        w_t, zero = _cached((w,), f"cpu-transposed:{isa}", lambda w: _pack_cpu_transposed(w, isa))
        out = torch.empty_like(grad)
        _native.call("spab", "conv", _arg(grad, "grad"), _arg(out, "out"), _arg(w_t, "packed w"), _arg(zero, "b"),
                     _arg(add, "add"), _arg(mul, "mul"), threads=torch.get_num_threads(), isa=isa)
        return out
    g_inp = _conv_backward(grad, inp, w, (True, False, False))[0]
    if add is not None:
        g_inp.add_(add)
    return g_inp if mul is None else g_inp.mul_(mul)


def _weight_grads(grad: Tensor, inp: Tensor, w: Tensor, backend: str, need_w: bool, need_b: bool):
    """(dL/dw, dL/db) of conv2d(inp, w, b, padding=1) given grad = dL/doutput (None if not needed)."""
    if not (need_w or need_b):
        return None, None
    if backend != "cpp":
        return _conv_backward(grad, inp, w, (False, need_w, need_b))[1:]
    g_w = torch.empty_like(w, memory_format=torch.contiguous_format) if need_w else None
    g_b = torch.empty(w.shape[0]) if need_b else None
    _native.call("spab", "wgrad", _arg(grad, "grad"), _arg(inp, "inp"), _arg(g_w, "dw", "contiguous"),
                 _arg(g_b, "db", "contiguous"), threads=torch.get_num_threads())
    return g_w, g_b


def _conv_backward(grad: Tensor, inp: Tensor, w: Tensor, mask: tuple[bool, bool, bool]):
    """(dL/dinp, dL/dw, dL/db) of conv2d(inp, w, b, padding=1) given dL/doutput (None where not in mask)."""
    return torch.ops.aten.convolution_backward(
        grad, inp, w, [w.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, list(mask)
    )


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
    backend = _backend(x)
    h1, h2, d1, d2, g_o3, g_xres = _recompute(x, g_out, weights, backend)
    g_a2 = _input_grad(g_o3, h2, w3, backend, mul=d2)
    g_w3, g_b3 = _weight_grads(g_o3, h2, w3, backend, needs[5], needs[6])
    del h2, d2, g_o3
    g_a1 = _input_grad(g_a2, h1, w2, backend, add=g_h1, mul=d1)
    g_w2, g_b2 = _weight_grads(g_a2, h1, w2, backend, needs[3], needs[4])
    del h1, d1, g_a2
    g_x = _input_grad(g_a1, x, w1, backend, add=g_xres) if needs[0] else None
    g_w1, g_b1 = _weight_grads(g_a1, x, w1, backend, needs[1], needs[2])
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
