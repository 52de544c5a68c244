"""What checkpoint ``last`` holds for an exact resume: the adapters, their EMA, Adam's state, the
RNG states and the run's counters; capturing, checking and restoring it (files: ``checkpoint``)."""
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .config import ConfigError, TrainConfig
from .ema import EMA
from .errors import TrainingError

#: The JSON entries that ``restore`` needs.
RESUME_ENTRIES = ("iteration", "skipped", "nonfinite_run", "ema_updates", "best_psnr", "param_groups", "rng")


@dataclass
class Progress:
    """The run's counters (all saved in checkpoint ``last``)."""

    iteration: int = 0              # steps done, skipped ones included
    skipped: int = 0                # steps skipped because the loss or a gradient was non-finite
    nonfinite_run: int = 0          # how many of the last steps in a row were skipped
    best_psnr: float = -math.inf    # the best mean validation PSNR so far (checkpoint ``best``)


class TrainingState:
    """The resumable state of a run: ``capture()`` gives (tensors, JSON state) for checkpoint
    ``last``; ``restore`` puts such a pair back into the same objects after checking it.

    Tensors: ``lora.<name>`` and ``ema.<name>`` (adapter shapes), ``optim.<index>.<slot>`` (Adam's
    per-parameter state), ``rng.torch`` (+ ``rng.cuda.<i>``).
    """

    def __init__(self, params: dict[str, torch.Tensor], ema: EMA, optimizer: torch.optim.Optimizer,
                 progress: Progress, config: TrainConfig, world_size: int):
        self.params, self.ema, self.optimizer, self.progress = params, ema, optimizer, progress
        self.config, self.world_size = config, world_size

    def capture(self) -> tuple[dict[str, torch.Tensor], dict]:
        progress, total = self.progress, self.config.total_iterations
        tensors = {f"lora.{n}": p for n, p in self.params.items()}
        tensors.update({f"ema.{n}": t for n, t in self.ema.shadow.items()})
        opt = self.optimizer.state_dict()
        for index, slots in opt["state"].items():
            tensors.update({f"optim.{index}.{k}": v for k, v in slots.items()})
        rng_tensors, rng = checkpoint.rng_state()
        tensors.update(rng_tensors)
        stage_index, stage = self.config.stage_at(min(progress.iteration, total - 1))
        state = {
            "iteration": progress.iteration, "stage": stage_index,
            "next_sample": progress.iteration * stage.batch_size,
            "ema_updates": self.ema.updates, "skipped": progress.skipped,
            "nonfinite_run": progress.nonfinite_run, "best_psnr": progress.best_psnr,
            "param_groups": opt["param_groups"], "rng": rng, "world_size": self.world_size,
        }
        return tensors, state

    def restore(self, tensors: dict[str, torch.Tensor], state: dict, folder: Path) -> None:
        """Load checkpoint ``last`` of ``folder`` (as ``checkpoint.load`` returned it) into the
        parameters, EMA, optimizer, RNGs and counters; a ConfigError if its adapters are others,
        a CheckpointStateError if an entry or tensor is missing or wrong."""
        names = {k[len("lora."):] for k in tensors if k.startswith("lora.")}
        if names != set(self.params):
            raise ConfigError(f"{folder}: the checkpoint's adapters do not match model.targets "
                              f"(e.g. {sorted(names ^ set(self.params))[:3]})")
        self.check(tensors, state, Path(folder) / "last.json")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"lora.{n}"])
                self.ema.shadow[n].copy_(tensors[f"ema.{n}"])
        slots: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                slots.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
        checkpoint.set_rng_state(tensors, state["rng"])
        progress = self.progress
        progress.iteration, progress.skipped = state["iteration"], state["skipped"]
        progress.nonfinite_run, self.ema.updates = state["nonfinite_run"], state["ema_updates"]
        progress.best_psnr = state["best_psnr"]

    def check(self, tensors: dict[str, torch.Tensor], state: dict, source: Path) -> None:
        """CheckpointStateError naming the entry or tensor of ``source`` that cannot be resumed from."""
        missing = [k for k in RESUME_ENTRIES if k not in state]
        if missing:
            raise checkpoint.CheckpointStateError(f"{source}: entries {missing} are missing")
        total = self.config.total_iterations
        if not isinstance(state["iteration"], int) or not 0 <= state["iteration"] <= total:
            raise checkpoint.CheckpointStateError(
                f"{source}: iteration {state['iteration']!r} is outside this configuration's 0..{total}")
        params = list(self.params.items())
        for n, p in params:
            checkpoint.check_tensor(tensors, f"lora.{n}", p.shape, source)
            checkpoint.check_tensor(tensors, f"ema.{n}", p.shape, source)
        checkpoint.check_tensor(tensors, "rng.torch", torch.get_rng_state().shape, source)
        for key, value in tensors.items():
            if key.startswith("optim."):
                index = int(key.split(".")[1])
                if index >= len(params):
                    raise checkpoint.CheckpointStateError(f"{source}: tensor {key!r} is for no parameter")
                checkpoint.check_tensor(tensors, key, params[index][1].shape if value.dim() else (), source)


def save_checkpoint(folder: Path, name: str, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """``checkpoint.save``; a failure (e.g. ENOSPC) is a TrainingError saying the previous
    checkpoint ``name`` is intact (``checkpoint.save`` kept it complete)."""
    try:
        checkpoint.save(folder, name, tensors, state)
    except OSError as exc:
        raise TrainingError(f"cannot save checkpoint {name!r} of iteration {state['iteration']} in "
                            f"{folder}: {exc}; the previous {name!r} checkpoint is intact") from exc
