"""Exponential moving average of the trainable parameters (used for validation and export)."""
import torch


class EMA:
    """``shadow ← d·shadow + (1 − d)·param`` with a warm-up ``d = min(decay, (1 + n) / (10 + n))``
    after n updates, so that short runs are not dominated by the initial weights."""

    def __init__(self, named_params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().clone().float() for name, p in named_params.items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor]) -> None:
        d = self.current_decay()
        for name, p in named_params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - d)
        self.updates += 1
