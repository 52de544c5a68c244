"""One optimisation step of the adapters on a batch (SPEC §5): student and teacher forward, the
DSCLoRA loss, backward, a skip if the loss or a gradient is non-finite, clipping, Adam, EMA."""
import contextlib
from dataclasses import dataclass

import torch

from dsclora.losses import DSCLoRALoss

from . import distributed
from .config import TrainConfig
from .ema import EMA
from .errors import TrainingError
from .state import Progress


@dataclass
class TrainStep:
    """``step(lr, hr)``: one step on this process's part of a batch, LR (B, 3, h, w) and HR
    (B, 3, s·h, s·w); counts skipped steps in ``progress``."""

    model: torch.nn.Module              # the student (DistributedDataParallel in a distributed run)
    teacher: torch.nn.Module | None     # frozen; None when no term needs it
    loss_fn: DSCLoRALoss
    params: dict[str, torch.Tensor]     # the trainable adapters by name
    optimizer: torch.optim.Optimizer
    ema: EMA
    config: TrainConfig
    ctx: distributed.Context
    progress: Progress

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor, grad_norms: bool = False) -> dict[str, float] | None:
        """The loss terms averaged over the processes (and with ``grad_norms`` the gradient norm
        of each weighted term, GRAD_NORMS), or None if the step was skipped (non-finite)."""
        device = self.ctx.device
        lr, hr = lr.to(device, non_blocking=True), hr.to(device, non_blocking=True)
        features = self.config.loss.features if self.loss_fn.weights["ad"] > 0 else False
        with self.autocast():
            sr_s, f_s = forward(self.model, lr, features)
            sr_t = f_t = None
            if self.teacher is not None:
                with torch.no_grad():
                    sr_t, f_t = forward(self.teacher, lr, features)
            total, terms = self.loss_fn(sr_s, hr, sr_t, f_s, f_t, keep_graph=grad_norms)
        term_norms = self.term_gradient_norms(terms) if grad_norms else {}
        terms = {name: value.detach() for name, value in terms.items()}
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not distributed.all_true(self.ctx, torch.isfinite(total.detach()) & torch.isfinite(norm)):
            self.skip()
            return None
        self.progress.nonfinite_run = 0
        if self.config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.config.optim.grad_clip)
        self.optimizer.step()
        self.ema.update(self.params)
        names = ["loss", *terms, *term_norms]
        values = torch.stack([total.detach().float(), *(v.float() for v in (*terms.values(), *term_norms.values()))])
        return dict(zip(names, distributed.mean(self.ctx, values).tolist()))

    def autocast(self):
        """bf16 autocast with ``amp = "bf16"``, else nothing."""
        if self.config.amp == "bf16":
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def skip(self) -> None:
        """Drop this step's gradients; a TrainingError after ``max_nonfinite`` skips in a row."""
        progress = self.progress
        progress.skipped += 1
        progress.nonfinite_run += 1
        self.optimizer.zero_grad(set_to_none=True)
        if progress.nonfinite_run >= self.config.max_nonfinite:
            raise TrainingError(
                f"non-finite loss or gradients in {progress.nonfinite_run} consecutive steps (last at "
                f"iteration {progress.iteration}); lower the learning rate or turn off amp"
            )

    def term_gradient_norms(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{grad_<term>: ‖∂(λ·term)/∂adapters‖} (this process's batch; one extra backward each)."""
        params = list(self.params.values())
        norms = {}
        for name, value in terms.items():
            grads = torch.autograd.grad(self.loss_fn.weights[name] * value, params, retain_graph=True,
                                        allow_unused=True)
            norms[f"grad_{name}"] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None]))
        return norms


def forward(model: torch.nn.Module, lr: torch.Tensor, features: bool | str):
    """(SR (B, 3, s·h, s·w), its feature maps ``features`` or None if False)."""
    out = model(lr, return_features=features)
    return out if features else (out, None)
