"""DSCLoRA training: configuration, data, checkpoints and the trainer (``dsclora train``)."""
from .config import ConfigError, TrainConfig, load_config, to_toml
from .errors import TrainingError, TrainingInterrupted
from .trainer import Trainer, TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "load_config", "to_toml", "Trainer", "TrainingError",
           "TrainingInterrupted", "TrainResult", "train"]
