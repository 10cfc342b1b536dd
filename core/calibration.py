"""Temperature scaling and operating-point selection, both fitted on the validation split."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_curve


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising validation log-loss of sigmoid(logit / T) (Guo et al., 2017)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


THRESHOLD_MARGIN = 1e-4  # below the boundary image's probability: more than the engines' float32 noise (~1e-6)


def choose_threshold(labels: np.ndarray, probs: np.ndarray, target_sensitivity: float) -> float:
    """Highest probability threshold whose pneumonia recall still reaches the target, less a small margin.

    The highest such threshold gives the best specificity (normal recall) among all thresholds that meet the
    sensitivity target. Every score is a candidate (`drop_intermediate=False`): scikit-learn's default drops the
    points inside a vertical stretch of the ROC curve, which returned the LOWEST threshold of such a stretch (0.034
    where 0.907 met the target on one site's images). The threshold sits just below the score that reaches the
    target (half-way to the next lower score, at most `THRESHOLD_MARGIN`), not on it: that image's probability, served
    by another engine in float32, came out a millionth lower and was called NORMAL.
    """
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    index = int(np.nonzero(tpr >= target_sensitivity)[0][0])  # roc_curve orders thresholds from high to low
    boundary = float(thresholds[index])
    below = float(thresholds[index + 1]) if index + 1 < len(thresholds) else 0.0
    threshold = boundary - min((boundary - below) / 2, THRESHOLD_MARGIN)
    return float(min(max(threshold, 1e-6), 1.0))
