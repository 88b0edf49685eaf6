"""Task definitions: how a data set becomes batches and how predictions become metrics."""

from ..extras import require

require("train", "sharelora.tasks (task data and metrics)")

from .base import ONE_PROCESS, Processes, Task
from .classification import TASK_TYPES, ClassificationTask, EncodedSplit, label_space
from .metrics import PRIMARY_METRIC, classification_metrics, regression_metrics

__all__ = [
    "ONE_PROCESS",
    "Processes",
    "Task",
    "TASK_TYPES",
    "ClassificationTask",
    "EncodedSplit",
    "label_space",
    "PRIMARY_METRIC",
    "classification_metrics",
    "regression_metrics",
]
