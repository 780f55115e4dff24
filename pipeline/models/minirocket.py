"""MiniRocket (Dempster, Schmidt and Webb 2021) on the raw window: is a deep network needed?

Random convolutional kernels (aeon's implementation: 84 fixed kernels, dilations and
biases drawn from the training windows, about 10,000 features of "proportion of
positive values"), standardised, then a ridge classifier whose regularisation is
chosen by leave-one-out cross-validation on the training windows
(``RidgeClassifierCV``), as the authors do. Multichannel windows are supported.
Its input is the front end's standardised raw window, (n, channels, samples).

Saved with ``skops.io`` (no pickle), trusting only the types :func:`save_minirocket`
writes. aeon is an optional dependency: ``pip install -e ".[rocket]"``.
"""

from __future__ import annotations

import os

import numpy as np
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import RidgeClassifierCV
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from pipeline.values import is_whole

# The types a saved model holds beyond those skops trusts by default.
TRUSTED_TYPES = frozenset(
    {
        "pipeline.models.minirocket.MiniRocketClassifier",
        "aeon.transformations.collection.convolution_based._minirocket.MiniRocket",
    }
)
MIN_LENGTH = 9  # MiniRocket's kernels span 9 samples
EXTRA = 'minirocket needs aeon, which is not installed; pip install -e ".[rocket]"'


def require_aeon() -> None:
    """Raise ValueError (a setting the environment cannot satisfy) without aeon."""
    try:
        import aeon  # noqa: F401
    except ImportError:
        raise ValueError(EXTRA) from None


class MiniRocketClassifier(ClassifierMixin, BaseEstimator):
    """MiniRocket features and a cross-validated ridge classifier.

    Args:
        n_kernels: features to make (aeon rounds to a multiple of 84).
        max_dilations_per_kernel: the most dilations per kernel.
        alphas: the ridge penalties cross-validated (the authors' ``logspace(-3, 3, 10)``).
        random_state: seeds the kernels' dilations and biases.

    Attributes (after ``fit``):
        rocket_, scaler_, ridge_: the fitted transform, standardiser and classifier.
        classes_: the class labels. n_channels_, length_: the windows' shape.
        n_params_: fitted numbers: the ridge's weights and intercepts and the kernels' biases.
    """

    def __init__(
        self,
        n_kernels: int = 10_000,
        max_dilations_per_kernel: int = 32,
        alphas: list[float] | None = None,
        random_state: int = 0,
    ) -> None:
        self.n_kernels = n_kernels
        self.max_dilations_per_kernel = max_dilations_per_kernel
        self.alphas = alphas
        self.random_state = random_state

    def _check_params(self) -> None:
        """Refuse a bad setting (ValueError naming it) before any file is read."""
        for key in ("n_kernels", "max_dilations_per_kernel"):
            if not is_whole(getattr(self, key), minimum=1):
                raise ValueError(f"{key}={getattr(self, key)!r} must be a positive integer")
        if self.n_kernels < 84:
            raise ValueError(f"n_kernels={self.n_kernels} must be at least 84 (one of each)")
        alphas = self.alphas
        if alphas is not None and not (
            isinstance(alphas, list | tuple) and alphas and all(_positive(a) for a in alphas)
        ):
            raise ValueError(f"alphas={alphas!r} must be null or a list of positive numbers")
        require_aeon()

    def fit(self, x: np.ndarray, y: np.ndarray) -> MiniRocketClassifier:
        """Fit on windows (n, channels, samples) and their labels."""
        from aeon.transformations.collection.convolution_based import MiniRocket

        self._check_params()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[-1] < MIN_LENGTH:
            raise ValueError(
                f"its windows of {x.shape[-1]} samples are shorter than MiniRocket's kernels "
                f"({MIN_LENGTH} samples); use longer windows (data.segment.length_seconds)"
            )
        self.rocket_ = MiniRocket(
            n_kernels=self.n_kernels,
            max_dilations_per_kernel=self.max_dilations_per_kernel,
            random_state=self.random_state,
        ).fit(x)
        features = self.rocket_.transform(x)
        self.scaler_ = StandardScaler().fit(features)
        alphas = np.asarray(self.alphas if self.alphas is not None else np.logspace(-3, 3, 10))
        self.ridge_ = RidgeClassifierCV(alphas=alphas).fit(self.scaler_.transform(features), y)
        self.classes_ = self.ridge_.classes_
        self.n_channels_, self.length_ = int(x.shape[1]), int(x.shape[2])
        biases = sum(np.asarray(p).size for p in self.rocket_.parameters[-1:])
        self.n_params_ = int(self.ridge_.coef_.size + self.ridge_.intercept_.size + biases)
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Ridge scores (n, classes); two columns (-d, d) for two classes."""
        check_is_fitted(self)
        features = self.rocket_.transform(np.ascontiguousarray(x, dtype=np.float32))
        d = self.ridge_.decision_function(self.scaler_.transform(features))
        return np.stack([-d, d], axis=1) if d.ndim == 1 else d

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """The softmax of the ridge scores: a ranking of the classes, not calibrated
        probabilities (ridge scores are not log-odds)."""
        return softmax(self.decision_function(x), axis=1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.decision_function(x).argmax(axis=1)]


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def save_minirocket(model: MiniRocketClassifier, path: str | os.PathLike) -> None:
    """Save a fitted model with ``skops.io`` (no pickle)."""
    if not isinstance(model, MiniRocketClassifier):
        raise TypeError(f"model={type(model).__name__} must be a MiniRocketClassifier")
    check_is_fitted(model)
    import skops.io as sio  # 2 s to import (it scans scikit-learn): only when saving

    sio.dump(model, path)


def load_minirocket(path: str | os.PathLike) -> MiniRocketClassifier:
    """Load a model saved by :func:`save_minirocket`, trusting only :data:`TRUSTED_TYPES`.

    Raises:
        ValueError: the file holds another type; or aeon is not installed.
    """
    require_aeon()
    import skops.io as sio

    untrusted = sio.get_untrusted_types(file=path)
    unexpected = sorted(set(untrusted) - TRUSTED_TYPES)
    if unexpected:
        raise ValueError(f"{path} holds types a MiniRocket bundle never writes: {unexpected}")
    model = sio.load(path, trusted=untrusted)
    if not isinstance(model, MiniRocketClassifier):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a MiniRocketClassifier")
    return model
