"""The Trainer, optimisation, checkpoints and metrics."""

from .metrics import MetricsLogger, read_metrics
from .optim import learning_rate, make_optimizer, parameter_groups
from .trainer import TrainConfig, Trainer

__all__ = ["MetricsLogger", "TrainConfig", "Trainer", "learning_rate", "make_optimizer", "parameter_groups", "read_metrics"]
