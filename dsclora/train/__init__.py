"""DSCLoRA training: configuration, data, checkpoints and the trainer (``dsclora train``)."""
from .config import ConfigError, TrainConfig, load_config, to_toml
from .trainer import Trainer, TrainingError, TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "load_config", "to_toml", "Trainer", "TrainingError",
           "TrainResult", "train"]
