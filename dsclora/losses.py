"""DSCLoRA's training objective (SPEC §4, paper Eq. 6–9).

``L = λ_rec·L_rec(SR_s, HR) + λ_ts·L1(SR_s, SR_t) + λ_ad·Σ_l affinity(F_s^l, F_t^l)``
over paired feature maps (``loss.features``: the block outputs F1..F6, or the DSCF code's inner
maps of blocks 1-3), defaults (1, 0.1, 0.01); L_rec is L1 (or L2, the paper's ablation).
The affinity term's normalisation is FAKD's (its ``spatial_similarity`` + ``nn.L1Loss``): pixel
vectors divided by (‖F‖ + eps), mean of |A_S − A_T| over (b, i, j), summed over the layers.
The affinity term uses the fused op ``dsclora_kernels.spatial_affinity_loss`` (memory O(B·C·N)
instead of the naive O(B·N²)), so large stage-two patches fit in memory.
"""
import torch
import torch.nn.functional as F
from torch import nn

from dsclora_kernels import spatial_affinity_loss

RECONSTRUCTIONS = ("l1", "l2")


def _full_precision(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (autocast) -> float32; float32/float64 unchanged."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def affinity_distillation(features_s: list[torch.Tensor], features_t: list[torch.Tensor]) -> torch.Tensor:
    """Σ_l mean|A_S^l − A_T^l| over paired feature maps (B, C_s, H, W) / (B, C_t, H, W)."""
    if len(features_s) != len(features_t):
        raise ValueError(f"{len(features_s)} student vs {len(features_t)} teacher feature maps")
    terms = []
    for layer, (f_s, f_t) in enumerate(zip(features_s, features_t), start=1):
        if f_s.shape[0] != f_t.shape[0] or f_s.shape[2:] != f_t.shape[2:]:
            raise ValueError(f"feature map F{layer}: student {tuple(f_s.shape)} and teacher "
                             f"{tuple(f_t.shape)} differ in batch or spatial size")
        # Computed in at least float32 even under bf16 autocast (sign flips otherwise).
        terms.append(spatial_affinity_loss(_full_precision(f_s), _full_precision(f_t.detach())))
    return torch.stack(terms).sum()


class DSCLoRALoss(nn.Module):
    """The weighted sum of the three DSCLoRA terms; a term with weight 0 is not computed.

    ``forward(sr_s, hr, sr_t=None, features_s=None, features_t=None)`` with images (B, 3, sH, sW)
    and lists of feature maps returns ``(total, terms)``; ``terms`` maps "rec", "ts", "ad" to
    the unweighted values of the computed terms, detached unless ``keep_graph`` (to take each
    term's gradient on its own).
    """

    def __init__(self, rec: float = 1.0, ts: float = 0.1, ad: float = 0.01, reconstruction: str = "l1"):
        super().__init__()
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
        for name, value in (("rec", rec), ("ts", ts), ("ad", ad)):
            if value < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {value}")
        self.weights = {"rec": rec, "ts": ts, "ad": ad}
        self.reconstruction = reconstruction

    @property
    def needs_teacher(self) -> bool:
        return self.weights["ts"] > 0 or self.weights["ad"] > 0

    def forward(self, sr_s, hr, sr_t=None, features_s=None, features_t=None, keep_graph: bool = False):
        sr_s = _full_precision(sr_s)
        pixel = F.l1_loss if self.reconstruction == "l1" else F.mse_loss
        terms = {}
        if self.weights["rec"] > 0:
            terms["rec"] = pixel(sr_s, hr.to(sr_s.dtype))
        if self.weights["ts"] > 0:
            if sr_t is None:
                raise ValueError("the teacher-student term (ts > 0) needs the teacher's output sr_t")
            terms["ts"] = F.l1_loss(sr_s, sr_t.detach().to(sr_s.dtype))
        if self.weights["ad"] > 0:
            if features_s is None or features_t is None:
                raise ValueError("the affinity term (ad > 0) needs student and teacher features")
            terms["ad"] = affinity_distillation(features_s, features_t)
        if not terms:
            raise ValueError("all loss weights are 0: nothing to optimise")
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms if keep_graph else {name: value.detach() for name, value in terms.items()}
