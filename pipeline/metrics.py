"""Evaluation: scores to metrics, from one place for every model."""

from __future__ import annotations

import numpy as np
from scipy.special import softmax
from scipy.stats import binomtest
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


def file_level_predictions(
    scores: np.ndarray, y_true: np.ndarray, record: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each file's true class and prediction, its windows combined by the mean softmax score.

    Args:
        scores: (n_windows, n_classes) logits or decision scores.
        y_true: (n_windows,) true class indices (constant within a file).
        record: (n_windows,) file index of each window.

    Returns:
        ``(y_file, pred_file)``, one entry per file in the order of ``np.unique(record)``.
    """
    probs = softmax(scores, axis=1)
    files, first = np.unique(record, return_index=True)
    sums = np.zeros((len(files), probs.shape[1]))
    np.add.at(sums, np.searchsorted(files, record), probs)
    return np.asarray(y_true)[first], sums.argmax(1)


def file_level_accuracy(scores: np.ndarray, y_true: np.ndarray, record: np.ndarray) -> float:
    """Accuracy per file, each file's windows combined by the mean of their softmax scores."""
    y_file, pred_file = file_level_predictions(scores, y_true, record)
    return float(np.mean(y_file == pred_file))


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's exact test of two classifiers on the same test items.

    Only the discordant items count: ``a_only`` items that A got right and B wrong,
    ``b_only`` the reverse. Under the null hypothesis of equal error rates each
    discordant item is a fair coin, so the p-value is the two-sided binomial test of
    ``a_only`` successes in ``a_only + b_only`` trials (McNemar 1947; the exact form
    Dietterich 1998 recommends for comparing classifiers).

    Args:
        correct_a: (n,) booleans, whether model A classified item i correctly.
        correct_b: (n,) booleans for model B, on the same items in the same order.

    Returns:
        ``{"n", "a_only", "b_only", "p_value"}``; p is 1.0 when no item is discordant.
    """
    correct_a = np.asarray(correct_a, dtype=bool)
    correct_b = np.asarray(correct_b, dtype=bool)
    assert correct_a.shape == correct_b.shape, "both models must be scored on the same items"
    a_only = int((correct_a & ~correct_b).sum())
    b_only = int((~correct_a & correct_b).sum())
    return {
        "n": int(correct_a.size),
        "a_only": a_only,
        "b_only": b_only,
        "p_value": mcnemar_p(a_only, b_only),
    }


def mcnemar_p(a_only: int, b_only: int) -> float:
    """The exact two-sided p-value of :func:`mcnemar` from its discordant counts."""
    discordant = a_only + b_only
    return float(binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0


def pairwise_mcnemar(
    y_true: np.ndarray, predictions: dict[str, np.ndarray], *, unit: str = "images"
) -> list[dict]:
    """McNemar's exact test between every pair of models, with Holm's adjusted p-values.

    Args:
        y_true: (n,) true class indices.
        predictions: model name -> (n,) predicted class indices, in the order of ``y_true``.
        unit: what the items are (``images``, or ``files`` when each file's windows were
            combined first); recorded in every pair.

    Returns:
        One dict per pair ``(a, b)`` in the order of ``predictions``: the fields of
        :func:`mcnemar` plus ``a``, ``b`` and ``p_holm`` (Holm's step-down adjustment
        over all pairs of this run, which keeps the family-wise error rate).
    """
    names = list(predictions)
    correct = {n: np.asarray(predictions[n]) == np.asarray(y_true) for n in names}
    pairs = [
        {"a": a, "b": b, **mcnemar(correct[a], correct[b]), "unit": unit}
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    for pair, p in zip(pairs, holm([t["p_value"] for t in pairs]), strict=True):
        pair["p_holm"] = p
    return pairs


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (in their order), which keeps the
    family-wise error rate over all of them."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
