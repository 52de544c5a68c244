"""The networks of a run: the student (base SPAN + ConvLoRA adapters) and the frozen teacher."""
from dsclora.lora import LoRAReport, apply_dsclora
from dsclora.models import SPAN, load_model

from .config import ConfigError, ModelConfig, config_errors


def load_span(path: str, role: str) -> SPAN:
    """An eval-form SPAN from a checkpoint (a training-form file is re-parameterised); errors name
    ``model.<role>``."""
    with config_errors(f"model.{role}"):
        return load_model(path).reparameterize()


def build_student(config: ModelConfig) -> tuple[SPAN, LoRAReport]:
    """(the base SPAN with ConvLoRA adapters on ``config.targets``, a report of what was adapted)."""
    student = load_span(config.base, "base")
    with config_errors("model.ranks / model.targets"):
        report = apply_dsclora(student, config.ranks, tuple(config.targets), config.alpha_per_rank)
    return student, report


def load_teacher(config: ModelConfig, scale: int) -> SPAN:
    """The frozen eval-form teacher; a ConfigError if its scale is not the student's ``scale``."""
    teacher = load_span(config.teacher, "teacher").eval()
    teacher.requires_grad_(False)
    if teacher.upscale != scale:
        raise ConfigError(f"model.teacher: scale x{teacher.upscale} differs from the "
                          f"base model's x{scale}")
    return teacher
