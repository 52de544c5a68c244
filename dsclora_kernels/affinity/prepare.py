"""What every backend of the affinity loss shares: the inputs prepared (x̂, raw features, norms),
the tie bound below which a float32 sign may be wrong, the normalisation's backward, and D in
float64 (the values whose signs the kernels use)."""
from typing import NamedTuple

import torch


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
    # In float64, an image at a time (a bounded temporary), so x̂ is correctly rounded: a rounded
    # 1 / (‖F‖ + eps) would scale a whole pixel by one shared error, a bias that does not average
    # out in Σ|S − T| when student ≈ teacher (measured: 4x the loss error).
    for b in range(batch):
        image = raw[b].to(torch.float64, copy=True)
        torch.linalg.vector_norm(image, dim=0, keepdim=True, out=norm[b])
        xhat[b, :, :n].copy_(image.div_(norm[b] + eps))
    return Normalised(xhat, raw, norm)


def tie_bound(prepared: tuple[Normalised, Normalised], precision: str) -> float:
    """|D| below which a computed sign may be wrong; 0 in float64 (no refinement needed).

    float32: x̂ is correctly rounded (u/2) and a C-term dot product is within C·u, so
    |D_computed − D| ≤ (Cs + Ct + 2)·u with u = 2⁻²⁴; we use (Cs + Ct + 16)·u. "tf32x3" products
    carry ≈ 4u; "tf32" is not refined (its bound would cover most entries)."""
    xs, xt = prepared
    if xs.xhat.dtype == torch.float64 or precision == "tf32":
        return 0.0
    unit = 2.0**-24 * (4 if precision == "tf32x3" else 1)
    return (xs.xhat.shape[1] + xt.xhat.shape[1] + 16) * unit


def input_gradient(f: torch.Tensor, g: torch.Tensor, prepared: Normalised, eps: float, factor: float):
    """∂L/∂F (shape and dtype of f) for x̂ = F / (‖F‖ + eps), given ∂L/∂x̂ = factor · g:
    g/(‖F‖ + eps) − x̂ (x̂ᵀg)/‖F‖ per pixel, computed in place in g (B, C, ld)."""
    n = prepared.norm.shape[-1]
    g, xhat, norm = g[..., :n], prepared.xhat[..., :n], prepared.norm
    per_norm = torch.where(norm > 0, factor / norm, 0.0)  # zero pixels: x̂ = 0, no radial part
    for b in range(g.shape[0]):  # an image at a time: the x̂ᵀg product is a bounded temporary
        radial = (torch.linalg.vecdot(xhat[b], g[b], dim=0) * per_norm[b]).to(g.dtype)
        g[b].mul_((factor / (norm[b] + eps)).to(g.dtype)).addcmul_(xhat[b], radial, value=-1)
    return g.reshape(f.shape).contiguous().to(f.dtype)


def differences(xs: Normalised, xt: Normalised, eps: float) -> torch.Tensor:
    """D = S − T (B, N, N) in float64 from the raw features: the values whose signs the kernels use."""

    def affinity(x: Normalised):
        r = x.inverse_norm(eps).unsqueeze(1)
        raw = x.raw.double()
        return (raw.transpose(1, 2) @ raw) * (r.transpose(1, 2) * r)

    return affinity(xs) - affinity(xt)
