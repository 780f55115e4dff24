"""How far a model's confidence can be trusted, and how well it ranks each class.

scores (n, classes) -> probabilities -> expected calibration error (ECE) with its
reliability bins, negative log-likelihood (NLL), Brier score; one-vs-rest ROC AUC and
average precision per class. Temperature scaling (Guo et al. 2017, "On calibration of
modern neural networks"): one scalar ``T`` fitted on the validation split's scores by
L-BFGS on the NLL, the probabilities then ``softmax(scores / T)``; it moves no argmax.

Where a model's probabilities are the softmax of its scores (the networks' logits,
MiniRocket's ridge scores, the SVM's decision scores with ``scores=decision``), ``T``
is fitted and stored in its bundle (``bundle.json`` key ``temperature``); an SVM with
``scores=calibrated`` has Platt-scaled probabilities already, scored as they are.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.special import log_softmax, softmax
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.errors import BundleError

log = logging.getLogger(__name__)

N_BINS = 15
# Equal-width bins of the top-class confidence, (m-1)/15 < p <= m/15, as Guo et al.;
# equal-mass bins would follow the data, but a reader compares equal-width ones by eye.
BINNING = "equal-width"
# T is kept within these. A validation split without a mistake has no finite optimum (the
# NLL falls as T -> 0): :func:`calibrate` keeps T = 1 there.
T_MIN, T_MAX = 0.05, 20.0
KEY = "temperature"  # in bundle.json; absent means 1.0


def probabilities(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(scores / temperature)`` (n, classes), float64."""
    return softmax(np.asarray(scores, dtype=np.float64) / temperature, axis=1)


def reliability(probs: np.ndarray, y: np.ndarray, *, n_bins: int = N_BINS) -> dict:
    """The reliability diagram's bins of the top-class confidence.

    Args:
        probs: (n, classes) probabilities.
        y: (n,) true class indices.

    Returns:
        ``{"edges": (n_bins + 1,), "count", "confidence", "accuracy": (n_bins,)}`` as
        lists; an empty bin's confidence and accuracy are None.
    """
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    # bin m holds (m/n_bins, (m+1)/n_bins]; a confidence of exactly 0 joins the first
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.tolist(),
        "confidence": [float(c / k) if k else None for c, k in zip(conf_sum, count, strict=True)],
        "accuracy": [float(a) if k else None for a, k in zip(acc_sum / safe, count, strict=True)],
    }


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, *, n_bins: int = N_BINS) -> float:
    """ECE: the mean over images of |accuracy - confidence| of their bin (equal-width bins of
    the top-class confidence), in [0, 1]; 0 when confidence matches accuracy in every bin."""
    bins = reliability(probs, y, n_bins=n_bins)
    count = np.asarray(bins["count"], dtype=np.float64)
    conf = np.array([c or 0.0 for c in bins["confidence"]])
    acc = np.array([a or 0.0 for a in bins["accuracy"]])
    return float(np.sum(count * np.abs(acc - conf)) / max(count.sum(), 1.0))


def negative_log_likelihood(probs: np.ndarray, y: np.ndarray) -> float:
    """The mean of -log p(true class), p floored at 1e-15 (a certain mistake costs 34.5)."""
    picked = probs[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.maximum(picked, 1e-15))))


def brier_score(probs: np.ndarray, y: np.ndarray) -> float:
    """The mean over images of the squared distance between the probabilities and the
    one-hot truth, summed over classes (Brier 1950), in [0, 2]."""
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def scores_nll(scores: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """The NLL of ``softmax(scores / temperature)``, computed stably from the scores."""
    logp = log_softmax(np.asarray(scores, dtype=np.float64) / temperature, axis=1)
    return float(-np.mean(logp[np.arange(len(y)), y]))


def fit_temperature(scores: np.ndarray, y: np.ndarray, *, max_iter: int = 100) -> float:
    """The temperature minimising the NLL of ``softmax(scores / T)`` on (validation) scores.

    L-BFGS (strong Wolfe line search) on ``log T``, which keeps ``T`` positive, from T = 1;
    the result is clipped to [:data:`T_MIN`, :data:`T_MAX`].

    Args:
        scores: (n, classes) logits or decision scores.
        y: (n,) true class indices.
    """
    z = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    target = torch.as_tensor(np.asarray(y, dtype=np.int64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    return float(np.clip(t, T_MIN, T_MAX)) if math.isfinite(t) else 1.0


def threshold_free(probs: np.ndarray, y: np.ndarray, classes: list[str]) -> tuple[dict, list]:
    """One-vs-rest ROC AUC and average precision per class, and their macro means.

    A class with no test image, or whose images are all the test split has, has no
    one-vs-rest curve: it is left out (listed) rather than given NaN, and the macro means
    are over the others (None when none is left).

    Returns:
        ``({"per_class": {class: {"roc_auc", "average_precision"}}, "roc_auc_macro",
        "average_precision_macro"}, left_out)``.
    """
    per_class, left_out = {}, []
    for i, name in enumerate(classes):
        positive = y == i
        if positive.all() or not positive.any():
            left_out.append(name)
            continue
        per_class[name] = {
            "roc_auc": float(roc_auc_score(positive, probs[:, i])),
            "average_precision": float(average_precision_score(positive, probs[:, i])),
        }

    def macro(key: str) -> float | None:
        values = [v[key] for v in per_class.values()]
        return float(np.mean(values)) if values else None

    out = {
        "per_class": per_class,
        "roc_auc_macro": macro("roc_auc"),
        "average_precision_macro": macro("average_precision"),
    }
    return out, left_out


def figures(probs: np.ndarray, y: np.ndarray) -> dict:
    """ECE, NLL, Brier score and the reliability bins of probabilities (n, classes)."""
    return {
        "ece": expected_calibration_error(probs, y),
        "nll": negative_log_likelihood(probs, y),
        "brier": brier_score(probs, y),
        "reliability": reliability(probs, y),
    }


@dataclass
class Calibrated:
    """A model's test figures as calibrated, and what metrics.json keeps of them.

    Attributes:
        scores: the test scores divided by the temperature (the scores as reported:
            their softmax is the probability compare and predict give).
        temperature: the fitted ``T``; None where the model's probabilities are not a
            softmax of its scores (a Platt-scaled SVM), which is not scaled.
        record: the ``calibration`` entry of the model's metrics.
        flat: the headline figures (``ece``, ``nll``, ``brier``, AUC and AP macro means).
        per_class: {class: {"roc_auc", "average_precision"}}, to merge into ``per_class``.
    """

    scores: np.ndarray
    temperature: float | None
    record: dict
    flat: dict = field(default_factory=dict)
    per_class: dict = field(default_factory=dict)


def calibrate(
    scores: np.ndarray,
    y: np.ndarray,
    *,
    classes: list[str],
    val: tuple[np.ndarray, np.ndarray] | None,
    scalable: bool,
    probs: np.ndarray | None = None,
) -> Calibrated:
    """Fit the temperature on ``val`` and compute every figure on the test split.

    Args:
        scores: (n, classes) test scores (logits, decision scores).
        y: (n,) true test classes.
        classes: class names by index.
        val: (validation scores, classes), or None where there is no validation split
            (then ``T`` = 1).
        scalable: whether the model's probabilities are ``softmax(scores)`` (temperature
            scaling applies); if not, ``probs`` are its probabilities, scored as they are.
        probs: (n, classes) test probabilities of a model that is not scalable.
    """
    t0 = time.perf_counter()
    record: dict = {"bins": N_BINS, "binning": BINNING, "scaled": scalable}
    temperature = None
    if scalable:
        temperature = 1.0
        fitted = val is not None and len(val[1]) > 0
        # Without a mistake on validation the NLL falls as T -> 0 and has no minimum: the
        # bound would decide, so T stays 1 (and the report says why).
        record["separable"] = fitted and bool((val[0].argmax(axis=1) == val[1]).all())
        if fitted and not record["separable"]:
            temperature = fit_temperature(*val)
        if fitted:
            record["val_nll_before"] = scores_nll(*val)
            record["val_nll_after"] = scores_nll(*val, temperature)
            record["n_val"] = int(len(val[1]))
        record["fitted"] = fitted and not record["separable"]
        record["temperature"] = temperature
        record["before"] = figures(probabilities(scores), y)
        probs = probabilities(scores, temperature)
        scores = np.asarray(scores) / temperature
    after = figures(probs, y)
    record["after"] = after
    ranked, left_out = threshold_free(probs, y, classes)
    record["auc_left_out"] = left_out
    flat = {
        "ece": after["ece"],
        "nll": after["nll"],
        "brier": after["brier"],
        "roc_auc_macro": ranked["roc_auc_macro"],
        "average_precision_macro": ranked["average_precision_macro"],
    }
    if scalable:
        flat["ece_before"] = record["before"]["ece"]
    record["seconds"] = time.perf_counter() - t0
    return Calibrated(scores, temperature, record, flat, ranked["per_class"])


def calibrate_model(model, scores: np.ndarray, y: np.ndarray, **kwargs) -> Calibrated:
    """:func:`calibrate` for a fitted model adapter (:mod:`pipeline.models.base`): the
    temperature set on the adapter, so its ``probabilities`` use it, and logged.

    Args:
        kwargs: ``classes``, ``val`` and, for a model that is not scalable, ``probs``.
    """
    cal = calibrate(scores, y, scalable=model.softmax_scores, **kwargs)
    rec = cal.record
    if cal.temperature is not None:
        model.temperature = cal.temperature
        log.info(
            "calibration: T=%.3f (%s), test ECE %.4f -> %.4f, NLL %.4f -> %.4f, %.2f s",
            cal.temperature,
            _how(rec),
            rec["before"]["ece"],
            rec["after"]["ece"],
            rec["before"]["nll"],
            rec["after"]["nll"],
            rec["seconds"],
        )
    else:
        log.info(
            "calibration: not scaled (its own probabilities), test ECE %.4f, %.2f s",
            rec["after"]["ece"],
            rec["seconds"],
        )
    return cal


def _how(rec: dict) -> str:
    """How the temperature was chosen, for the log."""
    if rec["fitted"]:
        return f"fitted on {rec['n_val']} validation windows"
    if rec["separable"]:
        return f"kept: no mistake on the {rec['n_val']} validation windows to fit it on"
    return "no validation windows to fit it on"


def bundle_meta(model) -> dict:
    """What ``bundle.json`` keeps: ``{"temperature": T}`` where the model is scaled."""
    return {KEY: float(model.temperature)} if model.softmax_scores else {}


def bundle_temperature(meta: dict, *, file: Path | str) -> float:
    """The ``temperature`` of a ``bundle.json`` (1.0 where absent: a bundle saved before
    temperature scaling, or outside a training run).

    Raises:
        BundleError: not a positive finite number.
    """
    t = meta.get(KEY, 1.0)
    if isinstance(t, bool) or not isinstance(t, int | float) or not (math.isfinite(t) and t > 0):
        raise BundleError(
            f"{file}: temperature={t!r} must be a positive number (the softmax temperature "
            "fitted on the validation split; absent means 1.0); restore the bundle's files from "
            "the run that saved it, or retrain the model"
        )
    return float(t)


def merge(m: dict, cal: Calibrated) -> None:
    """Put a model's calibration into its metrics ``m``: the headline figures, the
    ``calibration`` record, and each class's AUC and AP beside its precision and recall."""
    m.update(cal.flat)
    m["calibration"] = cal.record
    for name, ranked in cal.per_class.items():
        m["per_class"][name].update(ranked)


# The figures a sweep summary gives per model: mean ± std over the runs of a setting.
SWEEP_KEYS = ("temperature", "ece_before", "ece", "nll", "roc_auc_macro", "average_precision_macro")


def sweep_stats(runs: list[dict], names: list[str], *, stats) -> dict[str, dict]:
    """{model: {figure: stats(values over the runs that have it)}} for :data:`SWEEP_KEYS`,
    for the models with calibration figures in at least one run.

    Args:
        runs: the runs of one setting, each with its ``metrics``.
        names: the models, in order.
        stats: values -> ``{"mean", "std", "n", "values"}`` (:mod:`pipeline.summary`'s).
    """
    out = {}
    for name in names:
        per = [r["metrics"]["models"].get(name, {}) for r in runs]
        values = {k: [v for m in per if (v := _sweep_value(m, k)) is not None] for k in SWEEP_KEYS}
        if any(values.values()):
            out[name] = {k: stats(v) for k, v in values.items() if v}
    return out


def _sweep_value(m: dict, key: str) -> float | None:
    """A model's figure ``key`` in one run; None in a run without calibration figures."""
    if "calibration" not in m:
        return None
    return m["calibration"].get("temperature") if key == "temperature" else m.get(key)
