"""Tests of the SVM baseline: estimator contract, learning, leakage, saving."""

import numpy as np
import pytest
import skops.io as sio
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.preprocessing import StandardScaler

from pipeline.models.svm import (
    SVMClassifier,
    image_features,
    load_svm,
    save_svm,
    stratified_subsample,
)
from tests.conftest import cli, write_tone_dataset


def bands(n_per_class: int, seed: int, n_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 1, 8, 6) whose class k has a bright band of frequency bins 2k..2k+2."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0.0, 0.5, size=(n_classes * n_per_class, 1, 8, 6)).astype(np.float32)
    y = np.repeat(np.arange(n_classes), n_per_class)
    for k in range(n_classes):
        X[y == k, :, 2 * k : 2 * k + 3, :] += 2.0
    return X, y


@pytest.fixture(scope="module")
def data():
    X_train, y_train = bands(20, seed=0)
    X_test, y_test = bands(10, seed=1)
    return X_train, y_train, X_test, y_test


# -- the estimator contract -------------------------------------------------------------------


def test_init_stores_parameters_unchanged_and_clone_works():
    params = {
        "features": "pooled",
        "pca": 0.9,
        "C": [1, 10],
        "gamma": ("scale",),
        "cv": 4,
        "scores": "calibrated",
        "random_state": 3,
        "n_jobs": 1,
        "max_windows": 500,
    }
    model = SVMClassifier(**params)
    for name, value in params.items():
        assert getattr(model, name) is value
    assert model.get_params() == params
    assert clone(model).get_params() == params
    assert SVMClassifier().set_params(C=5).C == 5


def test_unfitted_model_raises_not_fitted_error(data):
    X_train, *_ = data
    for scores in ("decision", "calibrated"):
        for method in ("predict", "decision_function", "predict_proba"):
            with pytest.raises(NotFittedError):
                getattr(SVMClassifier(scores=scores), method)(X_train)


# -- learning ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [{}, {"features": "pooled"}, {"pca": 5}, {"pca": 0.9}, {"scores": "calibrated"}],
    ids=["flat", "pooled", "pca-int", "pca-float", "calibrated"],
)
def test_separates_band_images(data, params):
    X_train, y_train, X_test, y_test = data
    model = SVMClassifier(**params)
    assert model.fit(X_train, y_train) is model
    np.testing.assert_array_equal(model.classes_, [0, 1, 2])
    assert model.score(X_test, y_test) >= 0.95
    assert set(model.best_params_) == {"C", "gamma"}
    assert model.best_params_["C"] in model.C
    assert model.best_params_["gamma"] in model.gamma
    assert len(model.cv_results_["params"]) == len(model.C) * len(model.gamma)
    assert model.decision_function(X_test).shape == (len(X_test), 3)
    proba = model.predict_proba(X_test)
    assert proba.shape == (len(X_test), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert (proba >= 0).all()


def test_two_classes_give_two_score_columns(data):
    X_train, y_train, X_test, _ = data
    keep = y_train < 2
    model = SVMClassifier().fit(X_train[keep], y_train[keep])
    scores = model.decision_function(X_test)
    assert scores.shape == (len(X_test), 2)
    np.testing.assert_allclose(scores[:, 0], -scores[:, 1])
    np.testing.assert_array_equal(model.classes_[scores.argmax(1)], model.predict(X_test))


def test_string_labels(data):
    X_train, y_train, X_test, y_test = data
    names = np.array(["hum", "knock", "whine"])
    model = SVMClassifier().fit(X_train, names[y_train])
    np.testing.assert_array_equal(model.classes_, names)
    assert (model.predict(X_test) == names[y_test]).mean() >= 0.95


def test_feature_shapes():
    X = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    flat = image_features(X, features="flat")
    pooled = image_features(X, features="pooled")
    assert flat.shape == (2, 3 * 4 * 5)
    assert pooled.shape == (2, 2 * 3 * 4)
    np.testing.assert_allclose(pooled[:, :12], X.mean(axis=-1).reshape(2, -1))
    np.testing.assert_allclose(pooled[:, 12:], X.std(axis=-1).reshape(2, -1))


@pytest.mark.parametrize(("pca", "components"), [(None, None), (3, 3), (0.999, None)])
def test_pca_step(data, pca, components):
    X_train, y_train, *_ = data
    model = SVMClassifier(pca=pca, C=1, gamma="scale").fit(X_train, y_train)
    steps = [name for name, _ in model.estimator_.steps]
    assert steps == (["standardscaler", "svc"] if pca is None else ["standardscaler", "pca", "svc"])
    if pca is None:
        return
    n_components = model.estimator_.named_steps["pca"].n_components_
    if components is not None:
        assert n_components == components
    else:
        assert 1 <= n_components < 8 * 6  # fewer than the pixels, enough for 99.9 %


# -- the search sees only the data given to fit -----------------------------------------------


@pytest.mark.parametrize("scores", ["decision", "calibrated"])
def test_search_fits_only_on_the_training_rows(data, monkeypatch, scores):
    X_train, y_train, X_test, _ = data
    train_rows = {row.tobytes() for row in image_features(X_train, features="flat")}
    test_rows = {row.tobytes() for row in image_features(X_test, features="flat")}
    seen = []  # every array any StandardScaler of the search or calibration is fitted on
    original_fit = StandardScaler.fit

    def spy(self, X, y=None, **kwargs):
        seen.append(np.asarray(X).copy())
        return original_fit(self, X, y, **kwargs)

    monkeypatch.setattr(StandardScaler, "fit", spy)
    model = SVMClassifier(cv=3, scores=scores).fit(X_train, y_train)

    n_search = 3 * len(model.C) * len(model.gamma)
    n_calibration = 3 if scores == "calibrated" else 0
    assert len(seen) == n_search + 1 + n_calibration  # folds x grid, refit, calibration folds
    for X in seen:
        rows = {row.tobytes() for row in X}
        assert rows <= train_rows
        assert not rows & test_rows
    sizes = sorted({len(X) for X in seen})
    assert sizes == [40, 60]  # two thirds of the 60 training images, then all of them


def test_folds_shrink_to_the_smallest_class(data):
    X_train, y_train, X_test, y_test = data
    keep = np.concatenate([np.flatnonzero(y_train == k)[:n] for k, n in enumerate([5, 5, 2])])
    model = SVMClassifier(cv=5).fit(X_train[keep], y_train[keep])
    assert model.n_splits_ == 2

    keep = np.concatenate([np.flatnonzero(y_train == k)[:n] for k, n in enumerate([3, 3, 1])])
    model = SVMClassifier(C=(7, 70), gamma=(1e-2, 1e-3)).fit(X_train[keep], y_train[keep])
    assert model.n_splits_ == 0
    assert model.best_params_ == {"C": 7, "gamma": 1e-2}
    assert model.predict(X_test).shape == y_test.shape
    with pytest.raises(ValueError, match=r"scores='calibrated' needs at least 2 members"):
        SVMClassifier(scores="calibrated").fit(X_train[keep], y_train[keep])


# -- saving -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scores", ["decision", "calibrated"])
def test_skops_round_trip_gives_identical_scores(data, tmp_path, scores):
    X_train, y_train, X_test, _ = data
    model = SVMClassifier(pca=4, scores=scores).fit(X_train, y_train)
    path = tmp_path / "svm.skops"
    save_svm(model, path)
    loaded = load_svm(path)
    assert isinstance(loaded, SVMClassifier)
    assert loaded.get_params() == model.get_params()
    np.testing.assert_array_equal(loaded.decision_function(X_test), model.decision_function(X_test))
    np.testing.assert_array_equal(loaded.predict_proba(X_test), model.predict_proba(X_test))
    np.testing.assert_array_equal(loaded.predict(X_test), model.predict(X_test))


class Stranger:
    """A type that save_svm never writes."""


def test_load_refuses_unexpected_types(data, tmp_path):
    X_train, y_train, *_ = data
    model = SVMClassifier(C=1, gamma="scale").fit(X_train, y_train)
    model.stranger_ = Stranger()
    path = tmp_path / "svm.skops"
    sio.dump(model, path)
    with pytest.raises(ValueError, match=r"holds types save_svm never writes: \[.*Stranger'\]"):
        load_svm(path)


def test_load_refuses_other_estimators(tmp_path):
    path = tmp_path / "scaler.skops"
    sio.dump(StandardScaler().fit(np.eye(3)), path)
    with pytest.raises(ValueError, match=r"holds a StandardScaler, not an SVMClassifier"):
        load_svm(path)


# -- bad input --------------------------------------------------------------------------------


def test_bad_image_shape_is_named(data):
    X_train, y_train, X_test, _ = data
    with pytest.raises(
        ValueError, match=r"X must have shape \(n, channels, height, width\); got shape \(60, 48\)"
    ):
        SVMClassifier().fit(X_train.reshape(60, -1), y_train)
    model = SVMClassifier(C=1, gamma="scale").fit(X_train, y_train)
    with pytest.raises(ValueError, match=r"got shape \(30, 8, 6\)"):
        model.predict(X_test[:, 0])
    with pytest.raises(ValueError, match=r"X has images of shape \(1, 8, 5\); .* \(1, 8, 6\)"):
        model.predict(X_test[..., :5])


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"features": "mfcc"}, r"features='mfcc' must be one of 'flat', 'pooled'"),
        ({"scores": "proba"}, r"scores='proba' must be one of 'decision', 'calibrated'"),
        ({"pca": 1.5}, r"pca=1.5 must be None, a number of components >= 1"),
        ({"cv": 1}, r"cv=1 must be an integer >= 2"),
        ({"C": (1, -1)}, r"C=\(1, -1\) must hold positive numbers; got -1"),
        ({"gamma": "sometimes"}, r"gamma='sometimes' must hold positive numbers or 'scale'"),
        ({"max_windows": 1}, r"max_windows=1 must be null \(every training window\) or a whole"),
        ({"max_windows": 2.5}, r"max_windows=2.5 must be null"),
    ],
)
def test_bad_parameters_raise_value_error_at_fit(data, params, match):
    X_train, y_train, *_ = data
    model = SVMClassifier(**params)  # __init__ validates nothing
    with pytest.raises(ValueError, match=match):
        model.fit(X_train, y_train)


def test_one_class_is_refused(data):
    X_train, y_train, *_ = data
    with pytest.raises(ValueError, match=r"y has 1 class \(\[0\]\); an SVM needs at least 2"):
        SVMClassifier().fit(X_train[y_train == 0], y_train[y_train == 0])


def test_parameter_count_is_what_the_fitted_pipeline_stores(data):
    X_train, y_train = data[0], data[1]
    model = SVMClassifier(C=[1.0], gamma=["scale"], cv=2).fit(X_train, y_train)
    scaler, svc = model.estimator_.steps[0][1], model.estimator_.steps[-1][1]
    expected = (
        scaler.mean_.size
        + scaler.scale_.size
        + svc.support_vectors_.size
        + svc.dual_coef_.size
        + svc.intercept_.size
    )
    assert model.n_params_ == expected > 0


# -- at scale: a stratified subsample beyond max_windows ----------------------------------------


def test_the_subsample_keeps_each_class_in_proportion_and_follows_the_seed():
    y = np.repeat([0, 1, 2, 3], [600, 300, 99, 1])
    keep = stratified_subsample(y, 100, seed=0)
    assert len(keep) == 100 and len(set(keep)) == 100 and (np.diff(keep) > 0).all()
    assert np.bincount(y[keep]).tolist() == [60, 30, 9, 1]  # the rare class keeps its one
    assert (stratified_subsample(y, 100, seed=0) == keep).all()
    assert not (stratified_subsample(y, 100, seed=1) == keep).all()


def test_beyond_max_windows_the_search_and_the_fit_see_the_subsample_only(data):
    X_train, y_train, X_test, y_test = data  # 60 training images
    model = SVMClassifier(C=[1.0], gamma=["scale"], cv=2, max_windows=30).fit(X_train, y_train)
    assert (model.train_windows_, model.fit_windows_) == (60, 30)
    assert model.estimator_[-1].n_support_.sum() <= 30
    assert np.mean(model.predict(X_test) == y_test) > 0.9
    every = SVMClassifier(C=[1.0], gamma=["scale"], cv=2).fit(X_train, y_train)
    assert (every.train_windows_, every.fit_windows_) == (60, 60)


def test_the_report_names_the_subsample(tmp_path):
    data = write_tone_dataset(tmp_path / "tones", n_per_class=8)
    proc = cli(
        "data=folder",
        f"data.root={data}",
        "models=[svm]",
        "svm.max_windows=10",
        "svm.C=[1.0]",
        "svm.gamma=[scale]",
        "svm.cv=2",
        "features.n_fft=64",
        "features.hop_length=16",
        "features.win_length=64",
        "features.size=[16,16]",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fitted on a stratified subsample of 10 of the" in proc.stdout + proc.stderr
    import json

    svm = json.loads((tmp_path / "run" / "metrics.json").read_text())["models"]["svm"]
    assert svm["fit_windows"] == 10 and svm["train_windows"] > 10
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"stratified subsample of 10 of the {svm['train_windows']:,} training windows" in report
