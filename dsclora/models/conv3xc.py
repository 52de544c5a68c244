"""Conv3XC: SPAN's re-parameterisable 3x3 convolution (SPEC §2)."""
import torch
import torch.nn.functional as F
from torch import nn


class Conv3XC(nn.Module):
    """3x3 conv c_in -> c_out, stride 1, 'same' padding; (B, c_in, H, W) -> (B, c_out, H, W).

    Training form (``form="train"``): ``sk(x) + conv3(conv2(conv1(pad1(x))))`` with branch
    widths ``gain * c``; zero padding is applied *before* the 1x1 ``conv1``, so the border
    carries conv1's bias. Eval form: the single 3x3 ``eval_conv``. Switching a training-form
    module to ``eval()`` collapses the branches into ``eval_conv`` once (exactly, in float64);
    ``reparameterize()`` does so and drops the branches for good.
    """

    def __init__(self, c_in: int, c_out: int, gain: int = 2, form: str = "train"):
        super().__init__()
        if form not in ("train", "eval"):
            raise ValueError(f"form must be 'train' or 'eval', got {form!r}")
        self.eval_conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        if form == "train":
            self.sk = nn.Conv2d(c_in, c_out, 1)
            self.conv = nn.Sequential(
                nn.Conv2d(c_in, c_in * gain, 1),
                nn.Conv2d(c_in * gain, c_out * gain, 3),
                nn.Conv2d(c_out * gain, c_out, 1),
            )
            self._collapse()

    @property
    def has_branches(self) -> bool:
        return hasattr(self, "sk")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_branches and self.training:
            return self.sk(x) + self.conv(F.pad(x, (1, 1, 1, 1)))
        return self.eval_conv(x)

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-form 3x3 (weight, bias) this module applies now, differentiable.

        Training form in training mode: collapsed from the branches on the fly. Otherwise
        ``eval_conv``'s; a conv that adapts its weight (``dsclora.lora.ConvLoRA``) provides
        ``effective_weight()``, which is used instead of its frozen ``weight``.
        """
        if self.has_branches and self.training:
            return self._collapsed()
        effective = getattr(self.eval_conv, "effective_weight", None)
        return (effective() if effective else self.eval_conv.weight), self.eval_conv.bias

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode and self.has_branches:
            self._collapse()
        return self

    def reparameterize(self) -> None:
        """Collapse into ``eval_conv`` and delete the training branches."""
        if self.has_branches:
            self._collapse()
            del self.sk, self.conv

    def _collapsed(self) -> tuple[torch.Tensor, torch.Tensor]:
        conv1, conv2, conv3 = self.conv
        return collapse_branches(
            conv1.weight, conv1.bias, conv2.weight, conv2.bias,
            conv3.weight, conv3.bias, self.sk.weight, self.sk.bias,
        )

    @torch.no_grad()
    def _collapse(self) -> None:
        weight, bias = self._collapsed()
        self.eval_conv.weight.copy_(weight)
        self.eval_conv.bias.copy_(bias)


def collapse_branches(w1, b1, w2, b2, w3, b3, w_sk, b_sk):
    """Eval-form (3x3 weight, bias) equal to ``sk(x) + conv3(conv2(conv1(pad1(x))))``.

    Shapes: w1 (m, c_in, 1, 1), w2 (n, m, 3, 3), w3 (c_out, n, 1, 1), w_sk (c_out, c_in, 1, 1).
    Computed in float64, returned in w2's dtype.
    """
    dtype = w2.dtype
    f64 = [t.double() for t in (w1, b1, w2, b2, w3, b3, w_sk, b_sk)]
    w1, b1, w2, b2, w3, b3, w_sk, b_sk = f64
    w12 = torch.einsum("nmhw,mi->nihw", w2, w1[:, :, 0, 0])
    b12 = torch.einsum("nmhw,m->n", w2, b1) + b2
    weight = torch.einsum("cn,nihw->cihw", w3[:, :, 0, 0], w12)
    weight[:, :, 1, 1] += w_sk[:, :, 0, 0]
    bias = w3[:, :, 0, 0] @ b12 + b3 + b_sk
    return weight.to(dtype), bias.to(dtype)
