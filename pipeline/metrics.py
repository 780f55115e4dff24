"""Evaluation: scores to metrics, from one place for every model."""

from __future__ import annotations

import numpy as np
from scipy.special import softmax
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class figures and the confusion matrix.

    Args:
        y_true: (n,) true class indices.
        y_pred: (n,) predicted class indices.
        classes: class names, indexed by class index.

    Returns:
        A JSON-serialisable dict; accuracies are fractions in [0, 1] and
        ``confusion[i][j]`` counts items of class i predicted as class j.
    """
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "n_test": int(len(y_true)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def file_level_accuracy(scores: np.ndarray, y_true: np.ndarray, record: np.ndarray) -> float:
    """Accuracy per file, each file's windows combined by the mean of their softmax scores.

    Args:
        scores: (n_windows, n_classes) logits or decision scores.
        y_true: (n_windows,) true class indices (constant within a file).
        record: (n_windows,) file index of each window.
    """
    probs = softmax(scores, axis=1)
    files = np.unique(record)
    correct = [probs[record == f].mean(axis=0).argmax() == y_true[record == f][0] for f in files]
    return float(np.mean(correct))
