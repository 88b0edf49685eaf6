"""Metrics for classification and regression, computed with scikit-learn and SciPy.

GLUE reports accuracy (SST-2, MNLI, QNLI, RTE), F1 (MRPC, QQP), Matthews correlation (CoLA)
and Pearson / Spearman correlation (STS-B). We compute every metric that applies so a table can
pick the one its task is known by. Every value is a plain float in [−1, 1] (not a percentage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# The metric a run selects its best checkpoint on (dev) and reports first, per task type.
PRIMARY_METRIC = {"classification": "accuracy", "regression": "pearson"}


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy, F1 and Matthews correlation of predicted class ids against gold class ids.

    F1 is the positive-class F1 for two classes (label 1 is "positive", as in GLUE) and the
    macro average over classes otherwise; ``f1_macro`` is always reported as well.
    """
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    y_pred = np.asarray(predictions, dtype=np.int64)
    y_true = np.asarray(labels, dtype=np.int64)
    if y_pred.shape != y_true.shape:
        raise ValueError(f"{len(y_pred)} predictions for {len(y_true)} labels; they must be equally many")
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on an empty split")
    classes = list(range(num_labels))
    f1_macro = f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)
    if num_labels == 2:
        f1 = f1_score(y_true, y_pred, labels=classes, pos_label=1, average="binary", zero_division=0)
    else:
        f1 = f1_macro
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1),
        "f1_macro": float(f1_macro),
        "mcc": float(matthews_corrcoef(y_true, y_pred)),
    }


def regression_metrics(predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation and mean squared error of predicted scores.

    A constant prediction has no defined correlation; it is reported as 0.0 (no better than
    chance) rather than NaN so means over seeds stay finite.
    """
    from scipy.stats import pearsonr, spearmanr

    y_pred = np.asarray(predictions, dtype=np.float64)
    y_true = np.asarray(labels, dtype=np.float64)
    if y_pred.shape != y_true.shape:
        raise ValueError(f"{len(y_pred)} predictions for {len(y_true)} labels; they must be equally many")
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on an empty split")

    def corr(fn) -> float:
        if len(y_true) < 2 or np.ptp(y_pred) == 0 or np.ptp(y_true) == 0:
            return 0.0
        value = float(fn(y_pred, y_true)[0])
        return 0.0 if math.isnan(value) else value

    return {
        "pearson": corr(pearsonr),
        "spearman": corr(spearmanr),
        "mse": float(np.mean((y_pred - y_true) ** 2)),
    }
