"""Training and evaluation of classification runs: the loop, its records, resume and comparisons."""

from ..extras import require

require("train", "sharelora.training (training runs, evaluation, studies)")

from .config import DEFAULT_LR, METHODS, TrainConfig
from .evaluate import evaluate, load_trained_model, read_run_info
from .lock import OutputDirLockedError
from .engine import RunExistsError
from .loop import train

__all__ = [
    "DEFAULT_LR",
    "METHODS",
    "TrainConfig",
    "OutputDirLockedError",
    "RunExistsError",
    "evaluate",
    "load_trained_model",
    "read_run_info",
    "train",
]
