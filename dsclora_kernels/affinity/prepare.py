"""What every backend of the affinity loss shares: the inputs prepared (x̂, raw features, norms),
the tie bound below which a float32 sign may be wrong, the normalisation's backward, and D in
float64 (the values whose signs the kernels use)."""
from typing import NamedTuple

import torch

#: Bytes of float64 temporaries the normalisation and its backward hold at once (images in chunks).
CHUNK_BYTES = 64 << 20


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class Normalised(NamedTuple):
    """One input, prepared: x̂ (B, C, ld) zero beyond the N pixels, the raw features F (B, C, N)
    contiguous, and the pixel norms ‖F‖ (B, 1, N) in float64."""

    xhat: torch.Tensor
    raw: torch.Tensor
    norm: torch.Tensor

    def inverse_norm(self, eps: float) -> torch.Tensor:
        return (1.0 / (self.norm + eps)).squeeze(1).contiguous()


def normalise(f: torch.Tensor, eps: float, dtype: torch.dtype, ld: int | None = None) -> Normalised:
    """x̂ = F / (‖F‖ + eps) per pixel in ``dtype``, rows of ``ld`` ≥ N elements (default N)."""
    raw = f.flatten(2).to(dtype).contiguous()
    batch, channels, n = raw.shape
    norm = raw.new_empty(batch, 1, n, dtype=torch.float64)
    xhat = raw.new_empty(batch, channels, ld or n)
    xhat[..., n:].zero_()
    # In float64, a chunk of images at a time (a bounded temporary), so x̂ is correctly rounded: a
    # rounded 1 / (‖F‖ + eps) would scale a whole pixel by one shared error, a bias that does not
    # average out in Σ|S − T| when student ≈ teacher (measured: 4x the loss error).
    for images in _chunks(batch, 8 * channels * n):
        block = raw[images].to(torch.float64, copy=True)
        torch.linalg.vector_norm(block, dim=1, keepdim=True, out=norm[images])
        xhat[images, :, :n].copy_(block.div_(norm[images] + eps))
    return Normalised(xhat, raw, norm)


def _chunks(batch: int, bytes_per_image: int) -> list[slice]:
    """Slices of the batch whose float64 temporaries stay within CHUNK_BYTES (at least one image):
    few launches for many small images, bounded memory for large ones."""
    step = max(1, CHUNK_BYTES // bytes_per_image)
    return [slice(b, min(b + step, batch)) for b in range(0, batch, step)]


def tie_bound(prepared: tuple[Normalised, Normalised], precision: str) -> float:
    """|D| below which a computed sign may be wrong; 0 in float64 (no refinement needed).

    With u = 2⁻²⁴ and unit pixel vectors (Σ_c |a_c||b_c| ≤ 1), each of S and T is off by:
    "ieee": x̂ correctly rounded (≤ 2u) plus a C-term fp32 dot (≤ C·u): |D_computed − D| ≤
    (Cs + Ct + 4)·u; we use (Cs + Ct + 16)·u.
    "tf32x3" (Triton: a_big = TF32(a) rounded to nearest, a_small = a − a_big read by the tensor
    cores with its 13 low bits dropped; a·b ≈ a_big·b_big + a_small·b_big + a_big·b_small, kept
    products exact): the dropped a_small·b_small and truncations ≤ 2⁻²² + 2·2⁻²¹ = 20u per unit
    product; x̂'s rounding 2u; the a_big·b_big chain of C fp32 additions with partial sums ≤ 1,
    ≤ 2u each if the tensor cores truncate (≤ 2.25·C·u in the 8-product block model of A100-class
    MMA), the small chains ≈ 2⁻¹⁰ of that: (3C + 25)·u each, so we use (3(Cs + Ct) + 50)·u
    (≈ 1.3e-5 for 26 / 28 channels; the error emulated on the CPU is ≈ 4u, tests/test_affinity.py).
    "tf32" is not refined (its bound, ≈ 2⁻⁹, would cover most tiles)."""
    xs, xt = prepared
    if xs.xhat.dtype == torch.float64:
        return 0.0
    return tie_bound_for(xs.xhat.shape[1], xt.xhat.shape[1], precision)


def tie_bound_for(cs: int, ct: int, precision: str) -> float:
    """``tie_bound`` of float32 features with cs / ct channels."""
    if precision == "tf32":
        return 0.0
    return (3 * (cs + ct) + 50 if precision == "tf32x3" else cs + ct + 16) * 2.0**-24


def input_gradient(f: torch.Tensor, g: torch.Tensor, prepared: Normalised, eps: float, factor: float):
    """∂L/∂F (shape and dtype of f) for x̂ = F / (‖F‖ + eps), given ∂L/∂x̂ = factor · g:
    g/(‖F‖ + eps) − x̂ (x̂ᵀg)/‖F‖ per pixel, computed in place in g (B, C, ld)."""
    n = prepared.norm.shape[-1]
    g, xhat, norm = g[..., :n], prepared.xhat[..., :n], prepared.norm
    per_norm = torch.where(norm > 0, factor / norm, 0.0)  # zero pixels: x̂ = 0, no radial part
    for images in _chunks(g.shape[0], 8 * g.shape[1] * n):  # the x̂ᵀg product is a bounded temporary
        radial = (torch.linalg.vecdot(xhat[images], g[images], dim=1).unsqueeze(1) * per_norm[images]).to(g.dtype)
        g[images].mul_((factor / (norm[images] + eps)).to(g.dtype)).addcmul_(xhat[images], radial, value=-1)
    return g.reshape(f.shape).contiguous().to(f.dtype)


def differences(xs: Normalised, xt: Normalised, eps: float) -> torch.Tensor:
    """D = S − T (B, N, N) in float64 from the raw features: the values whose signs the kernels use."""

    def affinity(x: Normalised):
        r = x.inverse_norm(eps).unsqueeze(1)
        raw = x.raw.double()
        return (raw.transpose(1, 2) @ raw) * (r.transpose(1, 2) * r)

    return affinity(xs) - affinity(xt)
