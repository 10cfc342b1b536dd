"""Classification and calibration metrics at a given operating point (scikit-learn based)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from training.data import CLASS_NAMES


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Weighted mean |accuracy - confidence| over equal-width confidence bins of the predicted class."""
    predicted = (probs >= 0.5).astype(int)
    confidence = np.where(predicted == 1, probs, 1.0 - probs)
    correct = (predicted == labels).astype(float)
    edges = np.linspace(0.5, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi) if lo > 0.5 else (confidence >= lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def classification_report(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """All headline metrics for pneumonia probabilities `probs` against 0/1 `labels`."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    predicted = (probs >= threshold).astype(int)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=[0, 1], zero_division=0
    )
    both_classes = len(np.unique(labels)) == 2
    return {
        "n": int(len(labels)),
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(labels, predicted)),
        "roc_auc": float(roc_auc_score(labels, probs)) if both_classes else float("nan"),
        "pr_auc": float(average_precision_score(labels, probs)) if both_classes else float("nan"),
        "ece": expected_calibration_error(labels, probs),
        "brier": float(brier_score_loss(labels, probs)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(CLASS_NAMES)
        },
        "confusion_matrix": confusion_matrix(labels, predicted, labels=[0, 1]).tolist(),
    }
