"""ConvLoRA adapters for SPAN (SPEC §3): inject, count, merge.

A ConvLoRA conv keeps its k x k weight ``W`` (C_out, C_in, k, k) and bias frozen and trains
``A`` (r·k, C_in·k) and ``B`` (C_out·k, r·k) — the loralib layout — with
``ΔW = (α/r) · (B @ A).reshape(C_out, C_in, k, k)``. The forward is one conv with ``W + ΔW``,
so merging ``W ← W + ΔW`` leaves the deployed network a plain SPAN.
"""
import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

#: Paper Table 2 ranks (α = 2r), keyed by the prefix of the adapted layers' names (SPEC §3).
PAPER_RANKS: dict[str, int] = {
    "block_1": 8, "block_2": 12, "block_3": 12, "block_4": 12, "block_5": 12, "block_6": 4,
    "conv_2": 24, "upsampler.0": 16,
}


class ConvLoRA(nn.Conv2d):
    """A ``nn.Conv2d`` with a trainable low-rank update of its weight; same shapes as the conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, rank: int,
                 alpha: float | None = None, **conv_kwargs):
        super().__init__(in_channels, out_channels, kernel_size, **conv_kwargs)
        if self.groups != 1:
            raise ValueError("ConvLoRA supports groups=1 convolutions only")
        if self.kernel_size[0] != self.kernel_size[1]:
            raise ValueError(f"ConvLoRA needs a square kernel, got {self.kernel_size}")
        if rank < 1:
            raise ValueError(f"ConvLoRA rank must be >= 1, got {rank}")
        k = self.kernel_size[0]
        self.rank = rank
        self.alpha = float(2 * rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.lora_A = nn.Parameter(self.weight.new_zeros(rank * k, in_channels * k))
        self.lora_B = nn.Parameter(self.weight.new_zeros(out_channels * k, rank * k))
        self.merged = False
        self._base_weight: torch.Tensor | None = None  # the exact W while merged
        self.reset_lora_parameters()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, alpha: float | None = None) -> "ConvLoRA":
        """A ConvLoRA holding a copy of ``conv``'s weight and bias (same device and dtype)."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"expected a plain nn.Conv2d, got {type(conv).__name__}")
        lora = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size[0], rank, alpha,
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            lora.weight.copy_(conv.weight)
            if conv.bias is not None:
                lora.bias.copy_(conv.bias)
        lora.train(conv.training)
        return lora

    def reset_lora_parameters(self) -> None:
        """loralib's init: A ~ kaiming_uniform(a=√5) over fan_in = C_in·k, B = 0 (ΔW = 0)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (C_out, C_in, k, k), differentiable in A and B."""
        return (self.lora_B @ self.lora_A).reshape(self.weight.shape) * self.scaling

    def effective_weight(self) -> torch.Tensor:
        """The weight this conv applies: W + ΔW (or the merged W)."""
        return self.weight if self.merged else self.weight + self.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + ΔW (the exact W is kept for ``unmerge``)."""
        if not self.merged:
            self._base_weight = self.weight.detach().clone()
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact pre-merge W."""
        if self.merged:
            self.weight.copy_(self._base_weight)
            self._base_weight = None
            self.merged = False

    def to_conv(self, beta: float = 1.0) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with ``W_final = β·(W + ΔW) + (1 − β)·W = W + β·ΔW``."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, padding_mode=self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            base = self._base_weight if self.merged else self.weight
            conv.weight.copy_(base + beta * self.delta_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


#: The 20 layers DSCLoRA adapts in a SPAN: the 18 SPAB convs, conv_2 and upsampler.0 (SPEC §3).
TARGET_LAYERS: tuple[str, ...] = tuple(
    f"block_{i}.c{j}_r.eval_conv" for i in range(1, 7) for j in (1, 2, 3)
) + ("conv_2.eval_conv", "upsampler.0")


def rank_for(name: str, ranks: dict[str, int]) -> int:
    """The rank of layer ``name``: the entry of the longest key that is ``name`` or a prefix of it."""
    matches = [k for k in ranks if name == k or name.startswith(k + ".")]
    if not matches:
        raise KeyError(f"no rank given for layer {name!r} (rank table keys: {sorted(ranks)})")
    return ranks[max(matches, key=len)]


@dataclass(frozen=True)
class LoRAReport:
    """Parameter counts after ``apply_dsclora``."""

    trainable: int
    frozen: int
    layers: dict[str, int]  # adapted layer -> rank

    def __str__(self) -> str:
        total = self.trainable + self.frozen
        return (f"ConvLoRA on {len(self.layers)} layers: {self.trainable:,} trainable / "
                f"{total:,} parameters ({100 * self.trainable / total:.1f} %)")


def apply_dsclora(model: nn.Module, ranks: dict[str, int] | None = None,
                  targets: tuple[str, ...] = TARGET_LAYERS, alpha_per_rank: float = 2.0) -> LoRAReport:
    """Replace the target convs of an eval-form SPAN by ConvLoRA in place and freeze the rest.

    ``targets``: module names of plain ``nn.Conv2d`` layers (default ``TARGET_LAYERS``);
    ``ranks``: layer-name prefix -> rank (default ``PAPER_RANKS``), α = ``alpha_per_rank``·r.
    Every parameter except the adapters' A and B is frozen, biases included.
    """
    ranks = PAPER_RANKS if ranks is None else ranks
    if any(getattr(m, "has_branches", False) for m in model.modules()):
        raise ValueError(
            "apply_dsclora needs an eval-form SPAN: the model still has Conv3XC training "
            "branches; call model.reparameterize() first"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in targets:
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"target layer {name!r} is not in the model") from None
        if isinstance(conv, ConvLoRA):
            raise ValueError(f"layer {name!r} already has a ConvLoRA adapter")
        if type(conv) is not nn.Conv2d:
            raise ValueError(f"target layer {name!r} is a {type(conv).__name__}, not a plain nn.Conv2d")
        rank = rank_for(name, ranks)
        lora = ConvLoRA.from_conv(conv, rank, alpha_per_rank * rank)
        lora.weight.requires_grad_(False)
        if lora.bias is not None:
            lora.bias.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lora)
        layers[name] = rank
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return LoRAReport(trainable, frozen, layers)


def lora_modules(model: nn.Module) -> dict[str, ConvLoRA]:
    """Every ConvLoRA in ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ConvLoRA)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors (``<layer>.lora_A`` / ``<layer>.lora_B``), detached."""
    return {
        f"{name}.{part}": getattr(m, part).detach()
        for name, m in lora_modules(model).items() for part in ("lora_A", "lora_B")
    }


def merge_dsclora(model: nn.Module, beta: float = 1.0) -> nn.Module:
    """A plain eval-form copy of ``model`` with every adapter merged: ``W = W + β·ΔW``.

    Equivalent to ``β·W_merged + (1 − β)·W_base`` (SPEC §3); ``model`` is left unchanged.
    The result has no ConvLoRA left, loads strictly into the official layout, and has
    ``requires_grad`` restored on all its parameters.
    """
    plain = copy.deepcopy(model)
    for name, m in lora_modules(plain).items():
        parent_name, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent_name) if parent_name else plain, child, m.to_conv(beta))
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain
