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
    roc_curve,
)

from core.card import CLASS_NAMES


def specificity_at(labels: np.ndarray, scores: np.ndarray, sensitivity: float = 0.98) -> float:
    """Best specificity among thresholds that keep at least this sensitivity: ranking quality, threshold-free."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(1 - fpr[np.nonzero(tpr >= sensitivity)[0][0]])


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
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


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, predicted: np.ndarray, rounds: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the headline metrics, resampling images within each class.

    `predicted` holds each image's decision (1 = pneumonia), so decisions made with per-image
    thresholds (cross-validation) are scored as they were made. Small site sets make single
    figures misleading; the interval says how far to trust them.
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    predicted = np.asarray(predicted).astype(bool)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in (0, 1)]
    draws: dict[str, list[float]] = {k: [] for k in ("roc_auc", "sensitivity", "specificity", "accuracy", "ece")}
    for _ in range(rounds):
        index = np.concatenate([rng.choice(members, len(members)) for members in by_class])
        y, p, d = labels[index], probs[index], predicted[index]
        draws["roc_auc"].append(roc_auc_score(y, p))
        draws["sensitivity"].append(d[y == 1].mean())
        draws["specificity"].append((~d[y == 0]).mean())
        draws["accuracy"].append((d == y).mean())
        draws["ece"].append(expected_calibration_error(y, p))
    tail = (1 - level) / 2 * 100
    return {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for k, v in draws.items()}
