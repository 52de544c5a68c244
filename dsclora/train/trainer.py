"""The DSCLoRA trainer (SPEC §5): frozen base SPAN + ConvLoRA student, frozen teacher,
Adam on the adapters, EMA, two patch-size stages, validation, exact resume, export.

Run folder (``config.run_dir``): ``config.toml`` (the resolved configuration), ``train_log.csv``,
``validation.csv``, ``checkpoints/`` (``last``/``best``), ``tensorboard/`` (if installed),
``loss_curve.png``, ``results.md``/``results.json`` and the exported plain SPAN
``dsclora_x{s}.pth``/``.safetensors``: with validation sets, the best validated model, the base
itself (validated at iteration 0) among the candidates, plus the final one as ``_last``.
"""
import contextlib
import copy
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dsclora.export import export, lora_config
from dsclora.lora import apply_dsclora, merge_dsclora
from dsclora.losses import DSCLoRALoss
from dsclora.models import SPAN, load_model

from . import checkpoint, distributed
from .config import ConfigError, TrainConfig, check_stages, to_toml
from .data import IterationSampler, PatchDataset, find_images
from .ema import EMA
from .report import bicubic_upscaler, evaluate_models, markdown_table, validation_sets
from .runlog import TERMS, RunLogs
from .stop import StopRequests, ignore_stop_signals

logger = logging.getLogger("dsclora")



class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite)."""


class TrainingInterrupted(TrainingError):
    """Ctrl+C (SIGINT) or SIGTERM stopped the run after a step; its checkpoint is saved."""


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    skipped_steps: int
    exported: dict[str, Path] = field(default_factory=dict)
    results: dict = field(default_factory=dict)


@contextlib.contextmanager
def config_errors(key: str):
    """Re-raise a bad file/folder/table error from inside the block as a ConfigError naming ``key``."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ConfigError):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ConfigError(f"{key}: {message}") from exc


def load_span(path: str, role: str) -> SPAN:
    """An eval-form SPAN from a checkpoint (a training-form file is re-parameterised)."""
    with config_errors(f"model.{role}"):
        return load_model(path).reparameterize()


class Trainer:
    """``Trainer(config, resume).run()`` trains, validates, checkpoints and exports."""

    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        self.ctx = distributed.setup(config.device)
        self.run_dir = Path(config.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._seed_everything(config.seed)
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self._build_models()
        self.loss_fn = DSCLoRALoss(config.loss.rec, config.loss.ts, config.loss.ad, config.loss.reconstruction)
        self.params = {n: p for n, p in self.student.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.Adam(
            list(self.params.values()), lr=config.stages[0].lr, betas=tuple(config.optim.betas),
            weight_decay=config.optim.weight_decay,
        )
        self.ema = EMA(self.params, config.optim.ema_decay)
        self.model = (DistributedDataParallel(self.student, device_ids=[self.ctx.device] if
                                              self.ctx.device.type == "cuda" else None)
                      if self.ctx.distributed else self.student)
        with config_errors("data"):
            self.entries = find_images(config.data.hr, config.data.lr, self.scale)
        self.iteration, self.skipped, self.nonfinite_run = 0, 0, 0
        self.stop_requests = StopRequests(self.ctx)
        self.best_psnr = -math.inf
        with config_errors("validation.hr"):
            self.val_sets = (validation_sets(config.validation.hr, self.scale)
                             if self.ctx.is_main and config.validation.hr else {})
        check_stages(config, self.scale, self.ctx.world_size)
        self._prepare_run_dir(resume)

    # ------------------------------------------------------------ setup
    def _seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def _build_models(self) -> None:
        config, device = self.config, self.ctx.device
        self.student = load_span(config.model.base, "base")
        self.scale = self.student.upscale
        with config_errors("model.ranks / model.targets"):
            self.lora_report = apply_dsclora(self.student, config.model.ranks, tuple(config.model.targets),
                                             config.model.alpha_per_rank)
        self.student.to(device).train()
        self.teacher = None
        if config.model.teacher and (config.loss.ts > 0 or config.loss.ad > 0):
            self.teacher = load_span(config.model.teacher, "teacher").to(device).eval()
            self.teacher.requires_grad_(False)
            if self.teacher.upscale != self.scale:
                raise ConfigError(f"model.teacher: scale x{self.teacher.upscale} differs from the "
                                  f"base model's x{self.scale}")
        if config.model.fused_blocks:
            for model in (self.student, self.teacher):
                if model is not None:
                    model.use_fused_blocks(True)

    def _prepare_run_dir(self, resume: bool) -> None:
        saved = checkpoint.load(self.ckpt_dir, "last") if self.ckpt_dir.is_dir() else None
        if saved is not None and not resume:
            raise ConfigError(f"run_dir: {self.run_dir} already holds a checkpoint; pass --resume to "
                              "continue it or choose another run_dir")
        if saved is not None:
            self._restore(*saved)
        elif resume and self.ctx.is_main:
            logger.info("dsclora: no checkpoint in %s, starting from the beginning", self.ckpt_dir)
        keep = self.iteration if saved is not None else None
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write(self.run_dir / "config.toml",
                                    lambda tmp: Path(tmp).write_text(to_toml(self.config)))
            self.logs = RunLogs(self.run_dir, self.config.total_iterations, keep)
            logger.info("dsclora: %s", self.lora_report)

    # ------------------------------------------------------------ checkpoints
    def _state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"lora.{n}": p for n, p in self.params.items()}
        tensors.update({f"ema.{n}": t for n, t in self.ema.shadow.items()})
        opt = self.optimizer.state_dict()
        for index, slots in opt["state"].items():
            tensors.update({f"optim.{index}.{k}": v for k, v in slots.items()})
        rng_tensors, rng = checkpoint.rng_state()
        tensors.update(rng_tensors)
        stage_index, stage = self.config.stage_at(min(self.iteration, self.config.total_iterations - 1))
        state = {
            "iteration": self.iteration, "stage": stage_index,
            "next_sample": self.iteration * stage.batch_size,
            "ema_updates": self.ema.updates, "skipped": self.skipped,
            "nonfinite_run": self.nonfinite_run, "best_psnr": self.best_psnr,
            "param_groups": opt["param_groups"], "rng": rng, "world_size": self.ctx.world_size,
        }
        return tensors, state

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        names = {k[len("lora."):] for k in tensors if k.startswith("lora.")}
        if names != set(self.params):
            raise ConfigError(f"{self.ckpt_dir}: the checkpoint's adapters do not match model.targets "
                              f"(e.g. {sorted(names ^ set(self.params))[:3]})")
        self._check_resume_state(tensors, state)
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
        self.iteration, self.skipped = state["iteration"], state["skipped"]
        self.nonfinite_run, self.ema.updates = state["nonfinite_run"], state["ema_updates"]
        self.best_psnr = state["best_psnr"]
        if self.ctx.is_main:
            logger.info("dsclora: resumed from %s at iteration %d", self.ckpt_dir, self.iteration)

    def _check_resume_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """CheckpointStateError naming the entry or tensor of ``last`` that cannot be resumed from."""
        source = self.ckpt_dir / "last.json"
        missing = [k for k in ("iteration", "skipped", "nonfinite_run", "ema_updates", "best_psnr",
                               "param_groups", "rng") if k not in state]
        if missing:
            raise checkpoint.CheckpointStateError(f"{source}: entries {missing} are missing")
        if not isinstance(state["iteration"], int) or not 0 <= state["iteration"] <= self.config.total_iterations:
            raise checkpoint.CheckpointStateError(
                f"{source}: iteration {state['iteration']!r} is outside this configuration's "
                f"0..{self.config.total_iterations}")
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

    def save_checkpoint(self) -> None:
        tensors, state = self._state()  # every process: optimizer state is identical on all
        if self.ctx.is_main:
            self._save("last", tensors, state)

    def _save(self, name: str, tensors: dict[str, torch.Tensor], state: dict) -> None:
        try:
            checkpoint.save(self.ckpt_dir, name, tensors, state)
        except OSError as exc:  # e.g. ENOSPC: checkpoint.save kept the previous one complete
            raise TrainingError(f"cannot save checkpoint {name!r} of iteration {self.iteration} in "
                                f"{self.ckpt_dir}: {exc}; the previous {name!r} checkpoint is intact") from exc

    # ------------------------------------------------------------ training
    def _loader(self, stage_index: int, start: int, stop: int) -> DataLoader:
        stage, data = self.config.stages[stage_index], self.config.data
        dataset = PatchDataset(self.entries, self.scale, stage.patch_size, self.config.seed,
                               data.augment, data.quantize_lr, data.cache_images)
        sampler = IterationSampler(start, stop, stage.batch_size, self.ctx.rank, self.ctx.world_size)
        # its own generator: creating the loader (again on resume) must not draw from the global RNG
        generator = torch.Generator().manual_seed(self.config.seed + stage_index)
        return DataLoader(dataset, batch_size=sampler.local, sampler=sampler, num_workers=data.workers,
                          pin_memory=self.ctx.device.type == "cuda", worker_init_fn=ignore_stop_signals,
                          generator=generator)

    def _autocast(self):
        if self.config.amp == "bf16":
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, lr: torch.Tensor, hr: torch.Tensor, grad_norms: bool = False) -> dict[str, float] | None:
        """One optimisation step; returns the loss terms (and with ``grad_norms`` the gradient
        norm of each weighted term, GRAD_NORMS), or None if it was skipped (non-finite)."""
        device = self.ctx.device
        lr, hr = lr.to(device, non_blocking=True), hr.to(device, non_blocking=True)
        features = self.config.loss.features if self.loss_fn.weights["ad"] > 0 else False
        with self._autocast():
            sr_s, f_s = self._forward(self.model, lr, features)
            sr_t = f_t = None
            if self.teacher is not None:
                with torch.no_grad():
                    sr_t, f_t = self._forward(self.teacher, lr, features)
            total, terms = self.loss_fn(sr_s, hr, sr_t, f_s, f_t, keep_graph=grad_norms)
        term_norms = self._term_gradient_norms(terms) if grad_norms else {}
        terms = {name: value.detach() for name, value in terms.items()}
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not distributed.all_true(self.ctx, torch.isfinite(total.detach()) & torch.isfinite(norm)):
            self.skipped += 1
            self.nonfinite_run += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.nonfinite_run >= self.config.max_nonfinite:
                raise TrainingError(
                    f"non-finite loss or gradients in {self.nonfinite_run} consecutive steps (last at "
                    f"iteration {self.iteration}); lower the learning rate or turn off amp"
                )
            return None
        self.nonfinite_run = 0
        if self.config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.config.optim.grad_clip)
        self.optimizer.step()
        self.ema.update(self.params)
        names = ["loss", *terms, *term_norms]
        values = torch.stack([total.detach().float(), *(v.float() for v in (*terms.values(), *term_norms.values()))])
        return dict(zip(names, distributed.mean(self.ctx, values).tolist()))

    def _term_gradient_norms(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{grad_<term>: ‖∂(λ·term)/∂adapters‖} (this process's batch; one extra backward each)."""
        params = list(self.params.values())
        norms = {}
        for name, value in terms.items():
            grads = torch.autograd.grad(self.loss_fn.weights[name] * value, params, retain_graph=True,
                                        allow_unused=True)
            norms[f"grad_{name}"] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None]))
        return norms

    @staticmethod
    def _forward(model, lr, features: bool | str):
        out = model(lr, return_features=features)
        return out if features else (out, None)

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
                if self.iteration == 0 and self.val_sets:
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
        config = self.config
        stage_index, stage = config.stage_at(self.iteration)
        stop = sum(s.iterations for s in config.stages[:stage_index + 1])
        start = stop - stage.iterations
        sums, counts, since, last = {}, {}, 0, time.perf_counter()
        for lr, hr in self._loader(stage_index, self.iteration, stop):
            for group in self.optimizer.param_groups:
                group["lr"] = stage.lr_at(self.iteration - start)
            log_now = (self.iteration + 1) % config.log_every == 0 or self.iteration + 1 == stop
            values = self.step(lr, hr, grad_norms=log_now)
            self.iteration += 1
            if values is not None:
                for k, v in values.items():
                    sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", *TERMS)},
                                refresh=False)
            bar.update(1)
            since += 1
            if log_now:
                now = time.perf_counter()
                self._log_train(stage_index, self.optimizer.param_groups[0]["lr"],
                                {k: v / counts[k] for k, v in sums.items()}, since / (now - last))
                sums, counts, since, last = {}, {}, 0, now
            if self.iteration % config.checkpoint_every == 0 or self.iteration == stop:
                self.save_checkpoint()
            if self.val_sets and (self.iteration % config.validation.every == 0 or self.iteration == stop):
                self.validate()
            if self.stop_requests.pending():
                if self.iteration % config.checkpoint_every and self.iteration != stop:
                    self.save_checkpoint()
                raise TrainingInterrupted(f"stopped at iteration {self.iteration} of {config.total_iterations}; "
                                          f"checkpoint saved in {self.ckpt_dir}; continue with --resume")

    def _log_train(self, stage: int, lr: float, means: dict, it_per_s: float) -> None:
        if self.ctx.is_main:
            self.logs.train_row(self.iteration, stage, lr, means, self.skipped, it_per_s)

    # ------------------------------------------------------------ evaluation and export
    def deployed_model(self, adapters: dict[str, torch.Tensor] | None = None) -> SPAN:
        """A plain eval-form SPAN: the student with ``adapters`` (default: the EMA) merged with β."""
        adapters = self.ema.shadow if adapters is None else adapters
        student = copy.deepcopy(self.student)
        with torch.no_grad():
            for name, p in student.named_parameters():
                if name in adapters:
                    p.copy_(adapters[name])
        return self._plain(merge_dsclora(student, self.config.model.beta))

    def _evaluate(self, models: dict) -> dict:
        v = self.config.validation
        border = self.scale if v.border < 0 else v.border
        return evaluate_models(models, self.val_sets, self.scale, border, v.channel, self.ctx.device)

    def validate(self) -> None:
        """Rank 0: PSNR/SSIM of the EMA model on the validation sets; keeps the best checkpoint."""
        if not self.ctx.is_main:
            return
        results = self._evaluate({"ema": self.deployed_model()})["ema"]
        self.logs.validation_rows(self.iteration, results)
        mean_psnr = sum(r["psnr"] for r in results.values()) / len(results)
        logger.info("dsclora: iteration %d: validation %s", self.iteration,
                    ", ".join(f"{n} {r['psnr']:.4f} dB / {r['ssim']:.4f}" for n, r in results.items()))
        if mean_psnr > self.best_psnr:
            self.best_psnr = mean_psnr
            tensors = {f"ema.{n}": t for n, t in self.ema.shadow.items()}
            self._save("best", tensors, {"iteration": self.iteration, "psnr": mean_psnr})

    def _finish(self) -> TrainResult:
        """Export ``dsclora_x{s}``: the best validated model, the base (iteration 0) included, or
        without validation the last one; with validation also ``dsclora_x{s}_last``."""
        result = TrainResult(self.run_dir, self.iteration, self.skipped)
        if not self.ctx.is_main:
            return result
        lora = lora_config(self.student)
        final = self.deployed_model()
        best = checkpoint.load(self.ckpt_dir, "best")
        if best is None:
            result.exported.update(self._export(final, "", lora))
            models = {"dsclora": final}
        else:
            tensors, state = best
            selected = self.deployed_model({n: tensors[f"ema.{n}"] for n in self.params})
            if state["iteration"] == 0:
                logger.warning("dsclora: no validated checkpoint beat the base model; %s is the base",
                               f"dsclora_x{self.scale}")
            result.exported.update(self._export(selected, "", lora))
            result.exported.update(self._export(final, "_last", lora))
            models = {f"dsclora (best: it {state['iteration']})": selected, "dsclora last": final}
        if self.val_sets:
            models = {"bicubic": bicubic_upscaler(self.scale),
                      "base": self._plain(load_span(self.config.model.base, "base")), **models}
            if self.teacher is not None:
                models["teacher"] = self.teacher
            result.results = self._evaluate(models)
            table = markdown_table(result.results, f"Evaluation after {self.iteration} iterations "
                                                   "(PSNR dB / SSIM)")
            checkpoint.atomic_write(self.run_dir / "results.md", lambda tmp: Path(tmp).write_text(table))
            checkpoint.atomic_write(self.run_dir / "results.json",
                                    lambda tmp: Path(tmp).write_text(json.dumps(result.results, indent=1)))
            logger.info("%s", table)
        self.logs.plot_losses()
        return result

    def _export(self, model: SPAN, tag: str, lora: dict) -> dict[str, Path]:
        """``dsclora_x{s}{tag}.pth`` and ``.safetensors``: the official eval-form layout."""
        cpu = copy.deepcopy(model).cpu()
        paths = [self.run_dir / f"dsclora_x{self.scale}{tag}{suffix}" for suffix in (".pth", ".safetensors")]
        return {path.name: export(cpu, "official", path, lora=lora) for path in paths}

    def _plain(self, model: SPAN) -> SPAN:
        model = model.to(self.ctx.device).eval().requires_grad_(False)
        if self.config.model.fused_blocks:
            model.use_fused_blocks(True)
        return model


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Train with ``config`` (see ``dsclora.train.config``); the CLI is ``dsclora train``."""
    return Trainer(config, resume).run()
