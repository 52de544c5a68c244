"""Model cost in the NTIRE efficient-SR conventions (SPEC §8): params, FLOPs, activations, convs.

FLOPs are conv multiply-adds with bias excluded (the fvcore convention the NTIRE reports use),
activations the sum of the conv outputs' elements, both for one image of the given size. They
are counted with forward hooks on the conv modules of the deployed (eval-form) model during one
CPU forward (about 0.3 s for DSCF at 256x256; the ``meta`` device would skip the arithmetic but
its first use imports for seconds).
"""
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .export import deploy_model
from .models import SPAN


@dataclass(frozen=True)
class ModelSummary:
    """Efficiency numbers of a model on one input of shape ``input_shape`` (1, C, H, W)."""

    input_shape: tuple[int, ...]
    params: int
    flops: int
    activations: int
    convs: int

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        return "\n".join([
            f"input        {shape}",
            f"params       {self.params / 1e6:.3f} M   ({self.params:,})",
            f"FLOPs        {self.flops / 1e9:.2f} G    (conv multiply-adds, bias excluded)",
            f"activations  {self.activations / 1e6:.2f} M   (conv output elements)",
            f"convs        {self.convs}",
        ])


def summarize(model: SPAN, size: int | tuple[int, int] = 256) -> ModelSummary:
    """Params, FLOPs, activations and conv count of ``model`` deployed (branches collapsed,
    adapters folded in) on a 1 x in_channels x H x W input (``size``: H = W, or (H, W))."""
    height, width = (size, size) if isinstance(size, int) else size
    deployed = deploy_model(model)
    params = sum(p.numel() for p in deployed.parameters())
    counts = {"flops": 0, "activations": 0, "convs": 0}

    def count(conv: nn.Conv2d, inputs, output: torch.Tensor) -> None:
        kh, kw = conv.kernel_size
        counts["flops"] += output.numel() * (conv.in_channels // conv.groups) * kh * kw
        counts["activations"] += output.numel()
        counts["convs"] += 1

    hooks = [m.register_forward_hook(count) for m in deployed.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            deployed(torch.zeros(1, deployed.in_channels, height, width))
    finally:
        for hook in hooks:
            hook.remove()
    return ModelSummary((1, deployed.in_channels, height, width), params, **counts)
