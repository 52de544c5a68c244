"""The ``"cpp"`` backend of ``spab``: the C++ kernels of ``dsclora_kernels._spab``
(csrc/cpu/spab.cpp), float32 on the CPU, weights packed per instruction set."""
from typing import Optional

import torch
from torch import Tensor

from .. import _extension, _native
from .reference import WEIGHT_NAMES
from .weight_cache import cached

NAME, EXTENSION = "cpp", "spab"


def status(device: torch.device) -> str:
    return _extension.cpu_status(EXTENSION, device)


def unsupported(x: Tensor) -> Optional[tuple[str, str]]:
    if x.dtype != torch.float32:
        return str(x.dtype), "the C++ kernel computes in float32 only; using the PyTorch reference"
    return None


def arg(t: Optional[Tensor], name: str, layout: str = "strided"):
    """t as an argument of the C++ kernels: float32 CPU memory, checked (None stays None)."""
    return _native.tensor(t, f"spab: {name}", torch.float32, layout)


def pack(*weights: Tensor, isa: str) -> tuple[Tensor, ...]:
    """(w1, b1, ...) -> (w1 in the C++ kernel's layout for ``isa``, b1, ...), float32."""
    packed = []
    for t in weights:
        t = t.detach().contiguous()
        if t.dim() == 4:
            w = arg(t, "w", "contiguous")  # checked before anything reaches the extension
            out = torch.empty(_extension.load(EXTENSION).packed_floats(t.shape[0]), dtype=torch.float32)
            _native.call(EXTENSION, "pack", w, arg(out, "packed w"), isa=isa)
            t = out
        packed.append(t)
    return tuple(packed)


def packed_weights(weights: tuple[Tensor, ...]) -> tuple[str, list]:
    """(ISA, the weights packed for it as kernel arguments)."""
    isa = _native.isa(EXTENSION)
    packed = cached(weights, f"cpu:{isa}", lambda *w: pack(*w, isa=isa))
    return isa, [arg(p, name) for p, name in zip(packed, WEIGHT_NAMES)]


def forward(x: Tensor, weights: tuple[Tensor, ...], out: Tensor, h1: Tensor) -> None:
    isa, packed = packed_weights(weights)
    _native.call(EXTENSION, "forward", arg(x, "x"), arg(out, "out"), arg(h1, "h1"), packed,
                 threads=torch.get_num_threads(), isa=isa)


def recompute(x: Tensor, g_out: Tensor, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    outputs = tuple(torch.empty_like(x) for _ in range(6))
    isa, packed = packed_weights(weights)
    names = ("h1", "h2", "d1", "d2", "g_o3", "g_xres")
    _native.call(EXTENSION, "recompute", arg(x, "x"), arg(g_out, "g_out"),
                 [arg(t, name) for t, name in zip(outputs, names)], packed,
                 threads=torch.get_num_threads(), isa=isa)
    return outputs


def _pack_transposed(w: Tensor, isa: str) -> tuple[Tensor, Tensor]:
    """The weight whose convolution is the input gradient of conv(., w) (channels swapped,
    taps flipped), packed for the C++ kernel on ``isa``, and a zero bias."""
    return pack(w.transpose(0, 1).flip(2, 3), isa=isa)[0], torch.zeros(w.shape[0])


def input_grad(grad: Tensor, inp: Tensor, w: Tensor, add: Optional[Tensor] = None,
               mul: Optional[Tensor] = None) -> Tensor:
    """(dL/dinp + add) * mul for conv2d(inp, w, padding=1) given grad = dL/doutput."""
    isa = _native.isa(EXTENSION)
    w_t, zero = cached((w,), f"cpu-transposed:{isa}", lambda w: _pack_transposed(w, isa))
    out = torch.empty_like(grad)
    _native.call(EXTENSION, "conv", arg(grad, "grad"), arg(out, "out"), arg(w_t, "packed w"), arg(zero, "b"),
                 arg(add, "add"), arg(mul, "mul"), threads=torch.get_num_threads(), isa=isa)
    return out


def weight_grads(grad: Tensor, inp: Tensor, w: Tensor, need_w: bool, need_b: bool):
    """(dL/dw, dL/db) of conv2d(inp, w, b, padding=1) given grad = dL/doutput (None if not needed)."""
    g_w = torch.empty_like(w, memory_format=torch.contiguous_format) if need_w else None
    g_b = torch.empty(w.shape[0]) if need_b else None
    _native.call(EXTENSION, "wgrad", arg(grad, "grad"), arg(inp, "inp"), arg(g_w, "dw", "contiguous"),
                 arg(g_b, "db", "contiguous"), threads=torch.get_num_threads())
    return g_w, g_b
