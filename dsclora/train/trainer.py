"""The DSCLoRA trainer (SPEC §5): frozen base SPAN + ConvLoRA student, frozen teacher,
Adam on the adapters, EMA, two patch-size stages, validation, exact resume, export.

``Trainer`` builds the run and drives the loop; the parts are ``step`` (one optimisation step),
``state`` (what checkpoint ``last`` holds), ``selection`` (validation, ``best``, export),
``runlog`` (logs) and ``stop`` (clean stops on signals).

Run folder (``config.run_dir``): ``config.toml`` (the resolved configuration), ``train_log.csv``,
``validation.csv``, ``checkpoints/`` (``last``/``best``), ``tensorboard/`` (if installed),
``loss_curve.png``, ``results.md``/``results.json`` and the exported plain SPAN
``dsclora_x{s}.pth``/``.safetensors``: with validation sets, the best validated model, the base
itself (validated at iteration 0) among the candidates, plus the final one as ``_last``.
"""
import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dsclora.losses import DSCLoRALoss

from . import checkpoint, distributed
from .config import ConfigError, TrainConfig, check_stages, config_errors, to_toml
from .data import IterationSampler, PatchDataset, find_images
from .ema import EMA
from .errors import TrainingInterrupted
from .networks import build_student, load_teacher
from .report import validation_sets
from .runlog import TERMS, RunLogs
from .selection import Selection
from .state import Progress, TrainingState, save_checkpoint
from .step import TrainStep
from .stop import StopRequests, ignore_stop_signals

logger = logging.getLogger("dsclora")


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    skipped_steps: int
    exported: dict[str, Path] = field(default_factory=dict)
    results: dict = field(default_factory=dict)


class Trainer:
    """``Trainer(config, resume).run()`` trains, validates, checkpoints and exports."""

    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        self.ctx = distributed.setup(config.device)
        self.run_dir = Path(config.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        seed_everything(config.seed, config.deterministic)
        self._build_models()
        self.params = {n: p for n, p in self.student.named_parameters() if p.requires_grad}
        self.progress = Progress()
        self.train_step = self._build_step()
        with config_errors("data"):
            self.entries = find_images(config.data.hr, config.data.lr, self.scale)
        ema, optimizer = self.train_step.ema, self.train_step.optimizer
        self.state = TrainingState(self.params, ema, optimizer, self.progress, config, self.ctx.world_size)
        self.stop_requests = StopRequests(self.ctx)
        with config_errors("validation.hr"):
            val_sets = (validation_sets(config.validation.hr, self.scale)
                        if self.ctx.is_main and config.validation.hr else {})
        self.selection = Selection(self.student, ema, config, self.ctx.device, val_sets, self.run_dir,
                                   self.ckpt_dir, self.progress)
        check_stages(config, self.scale, self.ctx.world_size)
        self._prepare_run_dir(resume)

    @property
    def iteration(self) -> int:
        """Steps done so far (skipped ones included)."""
        return self.progress.iteration

    # ------------------------------------------------------------ setup
    def _build_models(self) -> None:
        config, device = self.config, self.ctx.device
        self.student, self.lora_report = build_student(config.model)
        self.scale = self.student.upscale
        self.student.to(device).train()
        self.teacher = None
        if config.model.teacher and config.loss.needs_teacher:
            self.teacher = load_teacher(config.model, self.scale).to(device)
        if config.model.fused_blocks:
            for model in (self.student, self.teacher):
                if model is not None:
                    model.use_fused_blocks(True)

    def _build_step(self) -> TrainStep:
        """The loss, Adam on the adapters, their EMA, and the student (DDP-wrapped if distributed)."""
        config, ctx = self.config, self.ctx
        loss_fn = DSCLoRALoss(config.loss.rec, config.loss.ts, config.loss.ad, config.loss.reconstruction)
        optimizer = torch.optim.Adam(
            list(self.params.values()), lr=config.stages[0].lr, betas=tuple(config.optim.betas),
            weight_decay=config.optim.weight_decay,
        )
        ema = EMA(self.params, config.optim.ema_decay)
        model = (DistributedDataParallel(self.student, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
                 if ctx.distributed else self.student)
        return TrainStep(model, self.teacher, loss_fn, self.params, optimizer, ema, config, ctx, self.progress)

    def _prepare_run_dir(self, resume: bool) -> None:
        saved = checkpoint.load(self.ckpt_dir, "last") if self.ckpt_dir.is_dir() else None
        if saved is not None and not resume:
            raise ConfigError(f"run_dir: {self.run_dir} already holds a checkpoint; pass --resume to "
                              "continue it or choose another run_dir")
        if saved is not None:
            self.state.restore(*saved, self.ckpt_dir)
            if self.ctx.is_main:
                logger.info("dsclora: resumed from %s at iteration %d", self.ckpt_dir, self.iteration)
        elif resume and self.ctx.is_main:
            logger.info("dsclora: no checkpoint in %s, starting from the beginning", self.ckpt_dir)
        keep = self.iteration if saved is not None else None
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write(self.run_dir / "config.toml",
                                    lambda tmp: Path(tmp).write_text(to_toml(self.config)))
            self.logs = RunLogs(self.run_dir, self.config.total_iterations, keep)
            logger.info("dsclora: %s", self.lora_report)

    # ------------------------------------------------------------ the parts
    def step(self, lr: torch.Tensor, hr: torch.Tensor, grad_norms: bool = False) -> dict[str, float] | None:
        """One optimisation step on LR (B, 3, h, w) and HR (B, 3, s·h, s·w): see ``TrainStep``."""
        return self.train_step(lr, hr, grad_norms)

    def save_checkpoint(self) -> None:
        """Checkpoint ``last`` (written by rank 0)."""
        tensors, state = self.state.capture()  # every process: optimizer state is identical on all
        if self.ctx.is_main:
            save_checkpoint(self.ckpt_dir, "last", tensors, state)

    def validate(self) -> None:
        """Rank 0: PSNR/SSIM of the EMA model on the validation sets; keeps the best checkpoint."""
        if self.ctx.is_main:
            self.selection.validate(self.logs)

    # ------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train to the end of the last stage, then export and evaluate."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        config, total = self.config, self.config.total_iterations
        show = self.ctx.is_main and config.progress
        # disable=None: the bar shows on a terminal only; otherwise log lines report progress
        bar = tqdm(total=total, initial=self.iteration, disable=None if show else True, unit="it",
                   dynamic_ncols=True, desc="dsclora train")
        if self.ctx.is_main:
            self.logs.log_lines = bar.disable
        try:
            with logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext(), \
                    self.stop_requests.listening():
                if self.iteration == 0 and self.selection.val_sets:
                    self.validate()  # the base model (all ΔW = 0): the candidate to beat
                while self.iteration < total:
                    self._run_stage(bar)
                    distributed.barrier(self.ctx)
                return self._finish()
        finally:
            bar.close()
            if self.ctx.is_main:
                self.logs.close()
            distributed.teardown(self.ctx)

    def _run_stage(self, bar) -> None:
        config, progress = self.config, self.progress
        stage_index, stage = config.stage_at(progress.iteration)
        stop = sum(s.iterations for s in config.stages[:stage_index + 1])
        start = stop - stage.iterations
        optimizer = self.train_step.optimizer
        sums, counts, since, last = {}, {}, 0, time.perf_counter()
        for lr, hr in self._loader(stage_index, progress.iteration, stop):
            for group in optimizer.param_groups:
                group["lr"] = stage.lr_at(progress.iteration - start)
            log_now = (progress.iteration + 1) % config.log_every == 0 or progress.iteration + 1 == stop
            values = self.step(lr, hr, grad_norms=log_now)
            progress.iteration += 1
            if values is not None:
                for k, v in values.items():
                    sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", *TERMS)},
                                refresh=False)
            bar.update(1)
            since += 1
            if log_now:
                now = time.perf_counter()
                self._log_train(stage_index, optimizer.param_groups[0]["lr"],
                                {k: v / counts[k] for k, v in sums.items()}, since / (now - last))
                sums, counts, since, last = {}, {}, 0, now
            if progress.iteration % config.checkpoint_every == 0 or progress.iteration == stop:
                self.save_checkpoint()
            if self.selection.val_sets and (progress.iteration % config.validation.every == 0
                                            or progress.iteration == stop):
                self.validate()
            if self.stop_requests.pending():
                if progress.iteration % config.checkpoint_every and progress.iteration != stop:
                    self.save_checkpoint()
                raise TrainingInterrupted(f"stopped at iteration {progress.iteration} of {config.total_iterations}; "
                                          f"checkpoint saved in {self.ckpt_dir}; continue with --resume")

    def _loader(self, stage_index: int, start: int, stop: int) -> DataLoader:
        """This process's batches (LR, HR) of iterations ``start``..``stop`` - 1 of the stage."""
        stage, data = self.config.stages[stage_index], self.config.data
        dataset = PatchDataset(self.entries, self.scale, stage.patch_size, self.config.seed,
                               data.augment, data.quantize_lr, data.cache_images)
        sampler = IterationSampler(start, stop, stage.batch_size, self.ctx.rank, self.ctx.world_size)
        # its own generator: creating the loader (again on resume) must not draw from the global RNG
        generator = torch.Generator().manual_seed(self.config.seed + stage_index)
        return DataLoader(dataset, batch_size=sampler.local, sampler=sampler, num_workers=data.workers,
                          pin_memory=self.ctx.device.type == "cuda", worker_init_fn=ignore_stop_signals,
                          generator=generator)

    def _log_train(self, stage: int, lr: float, means: dict, it_per_s: float) -> None:
        if self.ctx.is_main:
            self.logs.train_row(self.iteration, stage, lr, means, self.progress.skipped, it_per_s)

    def _finish(self) -> TrainResult:
        """Rank 0 exports and evaluates (``Selection.finish``) and plots the losses."""
        result = TrainResult(self.run_dir, self.iteration, self.progress.skipped)
        if self.ctx.is_main:
            result.exported, result.results = self.selection.finish(self.teacher)
            self.logs.plot_losses()
        return result


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch, numpy and Python's RNGs; ``deterministic``: deterministic algorithms only."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Train with ``config`` (see ``dsclora.train.config``); the CLI is ``dsclora train``."""
    return Trainer(config, resume).run()
