"""Several feature pairs of one training step in one affinity-kernel launch.

Σ_l mean|A_S^l − A_T^l| over pairs (f_s^l, f_t^l) of the same batch and spatial size: the
students are zero-padded to the most channels and stacked along the batch, likewise the teachers,
and ``spatial_affinity_loss`` runs once on the stack with reduction "sum". Zero channels change
neither a pixel's norm nor any dot product, so every pair's S and T are unchanged; the stack's
sum divided by B·N² is the sum of the pairs' means. Gradients flow back through the padding and
the stacking to each pair's own features.
"""
import torch
import torch.nn.functional as F

from . import DEFAULT_PRECISION, spatial_affinity_loss


def spatial_affinity_loss_pairs(
    features_s: list[torch.Tensor],
    features_t: list[torch.Tensor],
    *,
    eps: float = 1e-8,
    precision: str = DEFAULT_PRECISION,
) -> torch.Tensor:
    """Σ_l mean over b, i, j of |A_S^l − A_T^l| for student maps (B, Cs_l, H, W) and teacher
    maps (B, Ct_l, H, W): every pair the same B, H, W; channels may differ between pairs."""
    if not features_s or len(features_s) != len(features_t):
        raise ValueError(f"spatial_affinity_loss_pairs: {len(features_s)} student vs {len(features_t)} "
                         "teacher feature maps (need the same number, at least one)")
    batch, _, height, width = features_s[0].shape
    for layer, (f_s, f_t) in enumerate(zip(features_s, features_t), start=1):
        for f in (f_s, f_t):
            if f.dim() != 4 or (f.shape[0], *f.shape[2:]) != (batch, height, width):
                raise ValueError(f"spatial_affinity_loss_pairs: pair {layer} has {tuple(f.shape)}, "
                                 f"the first student map (B, H, W) = {(batch, height, width)}")
    student, teacher = _stack(features_s), _stack(features_t)
    total = spatial_affinity_loss(student, teacher, reduction="sum", eps=eps, precision=precision)
    return total / (batch * (height * width) ** 2)


def _stack(features: list[torch.Tensor]) -> torch.Tensor:
    """(L·B, max C, H, W): the maps zero-padded to the most channels, concatenated along the batch."""
    channels = max(f.shape[1] for f in features)
    dtype = features[0].dtype
    for f in features[1:]:
        dtype = torch.promote_types(dtype, f.dtype)
    return torch.cat([F.pad(f.to(dtype), (0, 0, 0, 0, 0, channels - f.shape[1])) for f in features])
