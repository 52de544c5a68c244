"""Why a training run ends early (the CLI turns these into messages and exit codes)."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite, a checkpoint cannot be saved)."""


class TrainingInterrupted(TrainingError):
    """Ctrl+C (SIGINT) or SIGTERM stopped the run after a step; its checkpoint is saved."""
