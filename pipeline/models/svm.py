"""SVM baseline on STFT images, following scikit-learn's estimator contract.

Each image (channels, height, width) becomes one feature vector, then
``make_pipeline(StandardScaler(), [PCA()], SVC(kernel="rbf"))`` is fitted with
``C`` and ``gamma`` chosen by a stratified grid search on the training data
given to :meth:`SVMClassifier.fit` only. For an STFT image, height is
frequency and width is time.

Feature extraction runs inside the estimator's methods (not in a
``FunctionTransformer``), so a saved model holds only scikit-learn types and
:class:`SVMClassifier`, and :func:`load_svm` can trust an explicit short list.
"""

from __future__ import annotations

import os
from numbers import Integral, Real

import numpy as np
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from pipeline.errors import ConfigError

__all__ = ["SVMClassifier", "image_features", "load_svm", "save_svm"]

FEATURES = ("flat", "pooled")
SCORES = ("decision", "calibrated")


def image_features(X: np.ndarray, *, features: str) -> np.ndarray:
    """Turn images into feature vectors.

    Args:
        X: Images of shape (n, channels, height, width).
        features: ``"flat"``, every pixel, or ``"pooled"``, the mean and the
            standard deviation over the last (time) axis of every channel and
            height (frequency) bin, which makes the vector independent of the
            image width.

    Returns:
        Array of shape (n, channels * height * width) for ``"flat"`` or
        (n, 2 * channels * height) for ``"pooled"``: all means, then all
        standard deviations.

    Raises:
        ConfigError: If ``features`` is neither ``"flat"`` nor ``"pooled"``.
    """
    n = X.shape[0]
    if features == "flat":
        return X.reshape(n, -1)  # (n, C * H * W)
    if features == "pooled":
        mean = X.mean(axis=-1).reshape(n, -1)  # (n, C * H)
        std = X.std(axis=-1).reshape(n, -1)  # (n, C * H)
        return np.concatenate([mean, std], axis=1)  # (n, 2 * C * H)
    raise ConfigError(f"features={features!r} must be one of 'flat', 'pooled'")


def stratified_subsample(y: np.ndarray, size: int, *, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` of the labels ``y``, each class in proportion to its count
    (largest remainders; every class keeps at least one), drawn with ``seed``."""
    classes, counts = np.unique(y, return_counts=True)
    share = counts * size / len(y)
    take = np.maximum(1, np.floor(share).astype(int))
    for i in np.argsort(take - share)[: max(0, size - int(take.sum()))]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(np.flatnonzero(y == c), size=min(n, k), replace=False)
        for c, n, k in zip(classes, take, counts, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def _as_grid(name: str, value: object) -> list:
    """A grid of ``C`` or ``gamma`` values as a non-empty list, validated."""
    values = list(value) if isinstance(value, list | tuple) else [value]
    for v in values:
        ok_string = name == "gamma" and v in ("scale", "auto")
        ok_number = isinstance(v, Real) and not isinstance(v, bool) and v > 0
        if not (ok_string or ok_number):
            allowed = (
                "positive numbers or 'scale' / 'auto'" if name == "gamma" else "positive numbers"
            )
            raise ConfigError(f"{name}={value!r} must hold {allowed}; got {v!r}")
    if not values:
        raise ConfigError(f"{name}={value!r} must hold at least one value")
    return values


class SVMClassifier(ClassifierMixin, BaseEstimator):
    """RBF-kernel SVM on image features, with ``C`` and ``gamma`` chosen by grid search.

    Args:
        features: ``"flat"`` (every pixel) or ``"pooled"`` (mean and standard
            deviation over time per channel and frequency bin); see
            :func:`image_features`.
        pca: ``None`` (no PCA), an int (number of components) or a float in
            (0, 1) (fraction of variance to keep), applied after scaling.
        C: Grid of ``C`` values (or one value).
        gamma: Grid of ``gamma`` values (or one value): positive numbers,
            ``"scale"`` or ``"auto"``.
        cv: Number of stratified folds of the search. When the smallest class
            has fewer members than ``cv``, the search uses that many folds;
            when it has a single member, no search runs and the first values
            of ``C`` and ``gamma`` are used.
        scores: What :meth:`predict_proba` returns: ``"decision"``, the
            softmax of the decision scores (scores that sum to 1, not
            calibrated probabilities), or ``"calibrated"``, Platt-scaled
            probabilities from a ``CalibratedClassifierCV`` fitted on the
            training data after the search.
        random_state: Seed of the fold shuffling (and of the subsample).
        n_jobs: Parallel jobs of the grid search (``None``: one).
        max_windows: The most training windows the search and the fit use (``None``: all):
            an exact RBF SVM's cost grows with about the square of the windows, so beyond
            this a stratified, seeded subsample of this many is used
            (:func:`stratified_subsample`).

    Attributes:
        classes_: Class labels, sorted, shape (n_classes,).
        image_shape_: (channels, height, width) of the training images.
        best_params_: ``{"C": ..., "gamma": ...}`` chosen by the search.
        cv_results_: Compact search summary: ``params`` (list of dicts) and
            ``mean_test_score``, ``std_test_score``, ``rank_test_score``
            (arrays, one entry per grid point); empty when no search ran.
        n_splits_: Folds used by the search; 0 when no search ran.
        estimator_: The best pipeline refitted on all training data; it takes
            feature vectors from :func:`image_features`, not images.
        calibrated_: The ``CalibratedClassifierCV`` for ``scores="calibrated"``,
            else ``None``.
        train_windows_: Training windows given to :meth:`fit`.
        fit_windows_: Training windows the search and the fit used (fewer than
            ``train_windows_`` beyond ``max_windows``).
    """

    def __init__(
        self,
        *,
        features="flat",
        pca=None,
        C=(0.1, 1, 10, 100),
        gamma=("scale", 1e-3, 1e-4),
        cv=3,
        scores="decision",
        random_state=0,
        n_jobs=None,
        max_windows=None,
    ):
        self.features = features
        self.pca = pca
        self.C = C
        self.gamma = gamma
        self.cv = cv
        self.scores = scores
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.max_windows = max_windows

    def _check_params(self) -> tuple[list, list]:
        if self.features not in FEATURES:
            raise ConfigError(f"features={self.features!r} must be one of 'flat', 'pooled'")
        if self.scores not in SCORES:
            raise ConfigError(f"scores={self.scores!r} must be one of 'decision', 'calibrated'")
        pca = self.pca
        if not (
            pca is None
            or (isinstance(pca, Integral) and not isinstance(pca, bool) and pca >= 1)
            or (isinstance(pca, float) and 0 < pca < 1)
        ):
            raise ConfigError(
                f"pca={pca!r} must be None, a number of components >= 1 or a fraction of "
                "variance in (0, 1), e.g. 0.95"
            )
        if isinstance(self.cv, bool) or not isinstance(self.cv, Integral) or self.cv < 2:
            raise ConfigError(f"cv={self.cv!r} must be an integer >= 2 (folds of the search)")
        m = self.max_windows
        if m is not None and (isinstance(m, bool) or not isinstance(m, Integral) or m < 2):
            raise ConfigError(
                f"max_windows={m!r} must be null (every training window) or a whole number of "
                "at least 2, e.g. 5000"
            )
        return _as_grid("C", self.C), _as_grid("gamma", self.gamma)

    def _check_images(self, X) -> np.ndarray:
        X = check_array(X, allow_nd=True, dtype=[np.float32, np.float64])
        if X.ndim != 4:
            raise ValueError(f"X must have shape (n, channels, height, width); got shape {X.shape}")
        return X

    def _pipeline(self, C, gamma):
        steps = [StandardScaler()]
        if self.pca is not None:
            steps.append(PCA(n_components=self.pca, random_state=self.random_state))
        steps.append(SVC(kernel="rbf", C=C, gamma=gamma, decision_function_shape="ovr"))
        return make_pipeline(*steps)

    def fit(self, X, y) -> SVMClassifier:
        """Choose ``C`` and ``gamma`` on (X, y) and fit the best pipeline on all of it.

        Only the data given here is used (pass the training split).

        Args:
            X: Images of shape (n, channels, height, width).
            y: Labels of shape (n,).

        Returns:
            self

        Raises:
            ConfigError: (a ``ValueError``) for an invalid parameter.
            ValueError: If X is not 4-D, y has fewer than two classes, or
                ``scores="calibrated"`` and a class has a single member.
        """
        C_grid, gamma_grid = self._check_params()
        X, y = check_X_y(X, y, allow_nd=True, dtype=[np.float32, np.float64])
        if X.ndim != 4:
            raise ValueError(f"X must have shape (n, channels, height, width); got shape {X.shape}")
        check_classification_targets(y)
        self.train_windows_ = len(y)
        if self.max_windows is not None and len(y) > self.max_windows:
            keep = stratified_subsample(y, self.max_windows, seed=self.random_state)
            X, y = X[keep], y[keep]
        self.fit_windows_ = len(y)
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) < 2:
            raise ValueError(
                f"y has {len(classes)} class ({classes.tolist()}); an SVM needs at least 2"
            )
        features = image_features(X, features=self.features)  # (n, n_features)

        # Never more folds than members of the smallest class; one member: no search.
        self.n_splits_ = int(min(self.cv, counts.min()))
        if self.n_splits_ >= 2:
            self._search(features, y, C_grid, gamma_grid)
        else:
            self.n_splits_ = 0
            self.estimator_ = self._pipeline(C_grid[0], gamma_grid[0]).fit(features, y)
            self.best_params_ = {"C": C_grid[0], "gamma": gamma_grid[0]}
            self.cv_results_ = {}

        self.calibrated_ = None
        if self.scores == "calibrated":
            self.calibrated_ = self._calibrate(features, y, classes, counts)

        self.classes_ = self.estimator_.classes_
        self.image_shape_ = tuple(int(d) for d in X.shape[1:])
        self.n_params_ = _count_parameters(self.estimator_)
        return self

    def _search(self, features: np.ndarray, y: np.ndarray, C_grid: list, gamma_grid: list) -> None:
        """Grid search over ``n_splits_`` stratified folds; sets the best pipeline and results.

        Args:
            features: Feature vectors of shape (n, n_features).
            y: Labels of shape (n,).
            C_grid: ``C`` values to try.
            gamma_grid: ``gamma`` values to try.
        """
        folds = StratifiedKFold(self.n_splits_, shuffle=True, random_state=self.random_state)
        search = GridSearchCV(
            self._pipeline(C_grid[0], gamma_grid[0]),
            {"svc__C": C_grid, "svc__gamma": gamma_grid},
            cv=folds,
            n_jobs=self.n_jobs,
        )
        search.fit(features, y)
        self.estimator_ = search.best_estimator_
        self.best_params_ = {
            "C": search.best_params_["svc__C"],
            "gamma": search.best_params_["svc__gamma"],
        }
        results = search.cv_results_
        self.cv_results_ = {
            "params": [{"C": p["svc__C"], "gamma": p["svc__gamma"]} for p in results["params"]],
            "mean_test_score": np.asarray(results["mean_test_score"]),
            "std_test_score": np.asarray(results["std_test_score"]),
            "rank_test_score": np.asarray(results["rank_test_score"]),
        }

    def _calibrate(
        self, features: np.ndarray, y: np.ndarray, classes: np.ndarray, counts: np.ndarray
    ) -> CalibratedClassifierCV:
        """The best pipeline, Platt-scaled on ``n_splits_`` folds of the training data.

        Args:
            features: Feature vectors of shape (n, n_features).
            y: Labels of shape (n,).
            classes: The sorted labels of ``y``.
            counts: Members of each class, in the order of ``classes``.

        Returns:
            The fitted calibrated classifier.

        Raises:
            ValueError: If a class has a single member (no folds to calibrate on).
        """
        if self.n_splits_ < 2:
            smallest = classes[counts.argmin()]
            raise ValueError(
                f"scores='calibrated' needs at least 2 members of every class for its "
                f"calibration folds; class {smallest!r} has {counts.min()}; "
                "use scores='decision' or add data"
            )
        folds = StratifiedKFold(self.n_splits_, shuffle=True, random_state=self.random_state)
        # Platt scaling ("sigmoid") on held-out folds of the training data, the
        # method SVC(probability=True) used before its deprecation.
        return CalibratedClassifierCV(
            self._pipeline(self.best_params_["C"], self.best_params_["gamma"]),
            method="sigmoid",
            cv=folds,
        ).fit(features, y)

    def _features(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = self._check_images(X)
        if X.shape[1:] != self.image_shape_:
            raise ValueError(
                f"X has images of shape {X.shape[1:]}; this model was fitted on "
                f"{self.image_shape_}; compute the images with the training settings"
            )
        return image_features(X, features=self.features)  # (n, n_features)

    def decision_function(self, X) -> np.ndarray:
        """One-vs-rest decision scores.

        Args:
            X: Images of shape (n, channels, height, width).

        Returns:
            Scores of shape (n, n_classes), higher for the more likely class;
            with two classes the columns are ``-d, d`` for scikit-learn's
            one-column score ``d``.
        """
        features = self._features(X)  # (n, n_features); checks fitted first
        scores = self.estimator_.decision_function(features)
        if scores.ndim == 1:  # two classes: (n,) -> (n, 2)
            scores = np.stack([-scores, scores], axis=1)
        return scores  # (n, n_classes)

    def predict_proba(self, X) -> np.ndarray:
        """Class scores that sum to 1 per row.

        With ``scores="decision"`` these are the softmax of
        :meth:`decision_function`: a ranking of classes, not calibrated
        probabilities. With ``scores="calibrated"`` they are Platt-scaled
        probabilities; their argmax may differ from :meth:`predict` near ties.

        Args:
            X: Images of shape (n, channels, height, width).

        Returns:
            Array of shape (n, n_classes), columns in the order of ``classes_``.
        """
        if self.scores == "calibrated":
            features = self._features(X)  # (n, n_features); checks fitted first
            return self.calibrated_.predict_proba(features)
        return softmax(self.decision_function(X), axis=1)

    def predict(self, X) -> np.ndarray:
        """Predicted labels of shape (n,) for images of shape (n, channels, height, width)."""
        features = self._features(X)  # (n, n_features); checks fitted first
        return self.estimator_.predict(features)


# Every type a model saved by save_svm may hold that skops does not trust by
# default (this class, and what CalibratedClassifierCV keeps after fitting);
# load_svm trusts these and nothing else.
TRUSTED_TYPES = frozenset(
    {
        f"{SVMClassifier.__module__}.{SVMClassifier.__qualname__}",
        "sklearn.calibration._CalibratedClassifier",
        "sklearn.calibration._SigmoidCalibration",
        "sklearn.model_selection._split.StratifiedKFold",
    }
)


def _count_parameters(pipeline) -> int:
    """Numbers a fitted pipeline stores to predict: scaler statistics, PCA basis,
    support vectors, dual coefficients and intercepts (the SVM's "parameters")."""
    names = ("mean_", "scale_", "components_", "support_vectors_", "dual_coef_", "intercept_")
    return int(
        sum(
            np.size(getattr(step, name))
            for _, step in pipeline.steps
            for name in names
            if getattr(step, name, None) is not None
        )
    )


def save_svm(model: SVMClassifier, path: str | os.PathLike) -> None:
    """Save a fitted model with ``skops.io`` (no pickle).

    Args:
        model: A fitted :class:`SVMClassifier`.
        path: File to write, conventionally ending in ``.skops``.

    Raises:
        TypeError: If ``model`` is not an :class:`SVMClassifier`.
        sklearn.exceptions.NotFittedError: If it is not fitted.
    """
    if not isinstance(model, SVMClassifier):
        raise TypeError(f"model={type(model).__name__} must be an SVMClassifier")
    check_is_fitted(model)
    import skops.io as sio  # 2 s to import (it scans scikit-learn): only when saving

    sio.dump(model, path)


def load_svm(path: str | os.PathLike) -> SVMClassifier:
    """Load a model saved by :func:`save_svm`, trusting only the types it writes.

    Args:
        path: File written by :func:`save_svm`.

    Returns:
        The fitted model.

    Raises:
        ValueError: If the file holds a type outside ``TRUSTED_TYPES`` (it
            was not written by :func:`save_svm` of this version), or is not an
            :class:`SVMClassifier`.
    """
    import skops.io as sio

    untrusted = sio.get_untrusted_types(file=path)
    unexpected = sorted(set(untrusted) - TRUSTED_TYPES)
    if unexpected:
        raise ValueError(
            f"path={os.fspath(path)!r} holds types save_svm never writes: {unexpected}; "
            "refusing to load them; re-save the model with save_svm"
        )
    model = sio.load(path, trusted=untrusted)
    if not isinstance(model, SVMClassifier):
        raise ValueError(
            f"path={os.fspath(path)!r} holds a {type(model).__name__}, not an SVMClassifier; "
            "save the model with save_svm"
        )
    return model
