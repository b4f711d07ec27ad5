"""GLUE metrics with scikit-learn and scipy: accuracy, F1, Matthews correlation, Pearson and Spearman."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def compute_metrics(metric_names: tuple[str, ...], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Compute the named metrics.

    Args:
        metric_names (`tuple[str, ...]`): Any of `accuracy`, `f1` (binary, positive class 1), `mcc`, `pearson`,
            `spearman`.
        predictions (`np.ndarray`): Class indices, or scores for regression.
        labels (`np.ndarray`): Gold class indices or scores.

    Returns:
        `dict[str, float]`: metric name to value (correlations of a constant prediction are reported as 0).
    """
    out: dict[str, float] = {}
    for name in metric_names:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions, zero_division=0.0))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name in ("pearson", "spearman"):
            if np.std(predictions) == 0 or np.std(labels) == 0:
                out[name] = 0.0  # undefined for a constant vector; 0 is what a constant predictor earns
            else:
                fn = pearsonr if name == "pearson" else spearmanr
                out[name] = float(fn(predictions, labels)[0])
        else:
            raise ValueError(f"Unknown metric '{name}'. Known: accuracy, f1, mcc, pearson, spearman.")
    return out
