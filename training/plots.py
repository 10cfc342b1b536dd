"""PNG plots of a training run: curves, ROC and confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from training.data import CLASS_NAMES  # noqa: E402


def training_curves(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    left.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    left.set_xlabel("epoch")
    left.legend()
    right.plot(epochs, [h["val_roc_auc"] for h in history], label="validation ROC-AUC")
    right.plot(epochs, [h["val_accuracy"] for h in history], label="validation accuracy @0.5")
    right.set_xlabel("epoch")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def roc(labels: np.ndarray, probs: np.ndarray, threshold: float, path: Path, title: str) -> None:
    fpr, tpr, thresholds = roc_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label="ROC")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    op = np.argmin(np.abs(thresholds - threshold))
    ax.scatter([fpr[op]], [tpr[op]], color="red", zorder=3, label=f"operating point (t={threshold:.3f})")
    ax.set_xlabel("1 - specificity (NORMAL called PNEUMONIA)")
    ax.set_ylabel("sensitivity (PNEUMONIA recall)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion(matrix: list[list[int]], path: Path, title: str) -> None:
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(m, cmap="Blues")
    for (i, j), value in np.ndenumerate(m):
        ax.text(j, i, str(value), ha="center", va="center", color="black", fontsize=14)
    ax.set_xticks([0, 1], CLASS_NAMES)
    ax.set_yticks([0, 1], CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
