"""Validation, selection and export (SPEC §5): rank 0 validates the EMA adapters merged into a
plain SPAN, keeps the best mean PSNR as checkpoint ``best`` (the base, validated at iteration 0,
among the candidates), and at the end exports the selected and the last model and compares them
with bicubic, the base and the teacher (``results.md``/``results.json``)."""
import copy
import json
import logging
from pathlib import Path

import torch

from dsclora.evaluation import ImagePair
from dsclora.export import export, lora_config
from dsclora.lora import merge_dsclora
from dsclora.models import SPAN

from . import checkpoint
from .config import TrainConfig
from .ema import EMA
from .networks import load_span
from .report import bicubic_upscaler, evaluate_models, markdown_table
from .runlog import RunLogs
from .state import Progress, save_checkpoint

logger = logging.getLogger("dsclora")


class Selection:
    """``validate(logs)`` during training and ``finish(teacher)`` at its end (rank 0 only).

    ``student``: the SPAN with ConvLoRA adapters; ``val_sets``: {name: pairs}, {} for none;
    ``checkpoints``: the folder of checkpoint ``best``; exports go to ``run_dir``.
    """

    def __init__(self, student: SPAN, ema: EMA, config: TrainConfig, device: torch.device,
                 val_sets: dict[str, list[ImagePair]], run_dir: Path, checkpoints: Path, progress: Progress):
        self.student, self.ema, self.config, self.device = student, ema, config, device
        self.val_sets, self.run_dir, self.checkpoints, self.progress = val_sets, run_dir, checkpoints, progress
        self.scale = student.upscale

    def deployed_model(self, adapters: dict[str, torch.Tensor] | None = None) -> SPAN:
        """A plain eval-form SPAN: the student with ``adapters`` (default: the EMA) merged with β."""
        adapters = self.ema.shadow if adapters is None else adapters
        student = copy.deepcopy(self.student)
        with torch.no_grad():
            for name, p in student.named_parameters():
                if name in adapters:
                    p.copy_(adapters[name])
        return self.plain(merge_dsclora(student, self.config.model.beta))

    def plain(self, model: SPAN) -> SPAN:
        """``model`` frozen in eval mode on the device (fused blocks if ``model.fused_blocks``)."""
        model = model.to(self.device).eval().requires_grad_(False)
        if self.config.model.fused_blocks:
            model.use_fused_blocks(True)
        return model

    def evaluate(self, models: dict) -> dict[str, dict[str, dict]]:
        """``{model: {set: {"psnr", "ssim", "seconds"}}}`` on the validation sets."""
        v = self.config.validation
        border = self.scale if v.border < 0 else v.border
        return evaluate_models(models, self.val_sets, self.scale, border, v.channel, self.device)

    def validate(self, logs: RunLogs) -> None:
        """PSNR/SSIM of the EMA model into ``logs``; a better mean PSNR is saved as ``best``."""
        iteration = self.progress.iteration
        results = self.evaluate({"ema": self.deployed_model()})["ema"]
        logs.validation_rows(iteration, results)
        mean_psnr = sum(r["psnr"] for r in results.values()) / len(results)
        logger.info("dsclora: iteration %d: validation %s", iteration,
                    ", ".join(f"{n} {r['psnr']:.4f} dB / {r['ssim']:.4f}" for n, r in results.items()))
        if mean_psnr > self.progress.best_psnr:
            self.progress.best_psnr = mean_psnr
            tensors = {f"ema.{n}": t for n, t in self.ema.shadow.items()}
            save_checkpoint(self.checkpoints, "best", tensors, {"iteration": iteration, "psnr": mean_psnr})

    def finish(self, teacher: SPAN | None) -> tuple[dict[str, Path], dict]:
        """(exported {file name: path}, results of ``evaluate``, {} without validation sets).

        Exports ``dsclora_x{s}``: the best validated model, the base (iteration 0) included, or
        without validation the last one; with validation also ``dsclora_x{s}_last``.
        """
        lora = lora_config(self.student)
        final = self.deployed_model()
        best = checkpoint.load(self.checkpoints, "best")
        exported, results = {}, {}
        if best is None:
            exported.update(self.export(final, "", lora))
            models = {"dsclora": final}
        else:
            tensors, state = best
            selected = self.deployed_model({n: tensors[f"ema.{n}"] for n in self.ema.shadow})
            if state["iteration"] == 0:
                logger.warning("dsclora: no validated checkpoint beat the base model; %s is the base",
                               f"dsclora_x{self.scale}")
            exported.update(self.export(selected, "", lora))
            exported.update(self.export(final, "_last", lora))
            models = {f"dsclora (best: it {state['iteration']})": selected, "dsclora last": final}
        if self.val_sets:
            models = {"bicubic": bicubic_upscaler(self.scale),
                      "base": self.plain(load_span(self.config.model.base, "base")), **models}
            if teacher is not None:
                models["teacher"] = teacher
            results = self.evaluate(models)
            self.write_results(results)
        return exported, results

    def write_results(self, results: dict) -> None:
        """``results.md`` (also logged) and ``results.json`` in the run folder."""
        table = markdown_table(results, f"Evaluation after {self.progress.iteration} iterations (PSNR dB / SSIM)")
        checkpoint.atomic_write(self.run_dir / "results.md", lambda tmp: Path(tmp).write_text(table))
        checkpoint.atomic_write(self.run_dir / "results.json",
                                lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
        logger.info("%s", table)

    def export(self, model: SPAN, tag: str, lora: dict) -> dict[str, Path]:
        """``dsclora_x{s}{tag}.pth`` and ``.safetensors``: the official eval-form layout."""
        cpu = copy.deepcopy(model).cpu()
        paths = [self.run_dir / f"dsclora_x{self.scale}{tag}{suffix}" for suffix in (".pth", ".safetensors")]
        return {path.name: export(cpu, "official", path, lora=lora) for path in paths}
