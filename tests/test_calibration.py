"""Calibration (ECE, NLL, Brier, temperature scaling) and threshold-free metrics (AUC, AP):
the figures on synthetic scores, the temperature through compare, the bundle and predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.special import softmax
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import label_binarize

from pipeline import calibration, summary
from pipeline.bundle import load_bundle
from pipeline.errors import BundleError
from pipeline.models.base import SVM
from pipeline.models.svm import SVMClassifier
from pipeline.tasks.predict import Classifier
from tests.conftest import cli, read_csv

CLASSES = ["a", "b", "c"]


def drawn(n: int = 20_000, seed: int = 0, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits (n, 3) and labels drawn from their own softmax: perfectly calibrated scores."""
    rng = np.random.default_rng(seed)
    logits = scale * rng.normal(size=(n, 3))
    p = softmax(logits, axis=1)
    y = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)  # one draw per row
    return logits, y


def test_ece_is_near_zero_for_calibrated_scores_and_large_for_overconfident_ones():
    logits, y = drawn()
    calibrated = calibration.expected_calibration_error(softmax(logits, axis=1), y)
    overconfident = calibration.expected_calibration_error(softmax(3 * logits, axis=1), y)
    assert calibrated < 0.01
    assert overconfident > 0.1
    # the other figures agree: sharpening calibrated scores costs likelihood and Brier score
    for score in (calibration.negative_log_likelihood, calibration.brier_score):
        assert score(softmax(logits, axis=1), y) < score(softmax(3 * logits, axis=1), y)


def test_reliability_bins_are_equal_width_and_ece_is_their_weighted_gap():
    # 10 windows at confidence 0.8, 8 right (gap 0); 10 at 0.95, 5 right (gap 0.45)
    probs = np.array([[0.8, 0.1, 0.1]] * 10 + [[0.95, 0.05, 0.0]] * 10)
    y = np.array([0] * 8 + [1] * 2 + [0] * 5 + [2] * 5)
    bins = calibration.reliability(probs, y)
    assert len(bins["edges"]) == calibration.N_BINS + 1 and sum(bins["count"]) == 20
    # 0.8 = 12/15 falls in (11/15, 12/15], bin 11; 0.95 in (14/15, 1], bin 14
    assert bins["count"][11] == 10 and bins["count"][14] == 10
    assert bins["accuracy"][11] == pytest.approx(0.8) and bins["accuracy"][14] == 0.5
    assert bins["confidence"][0] is None  # an empty bin has no mean
    ece = calibration.expected_calibration_error(probs, y)
    assert ece == pytest.approx(0.5 * 0.0 + 0.5 * 0.45)
    assert calibration.brier_score(np.eye(3)[[0, 1]], np.array([0, 1])) == 0.0


def test_temperature_scaling_lowers_the_validation_nll_both_ways():
    logits, y = drawn(n=4000, seed=1)
    for factor in (3.0, 0.4):  # over-confident, then timid scores
        scores = factor * logits
        t = calibration.fit_temperature(scores, y)
        assert t == pytest.approx(factor, rel=0.1)  # it undoes the distortion
        assert calibration.scores_nll(scores, y, t) < calibration.scores_nll(scores, y) - 0.01
        before = calibration.expected_calibration_error(softmax(scores, axis=1), y)
        after = calibration.expected_calibration_error(calibration.probabilities(scores, t), y)
        assert after < before


def test_a_validation_split_without_a_mistake_keeps_t_at_1():
    scores, y = np.array([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]]), np.array([0, 1, 0])
    assert calibration.fit_temperature(scores, y) < 0.5  # no minimum: L-BFGS walks towards 0
    cal = calibration.calibrate(scores, y, classes=["a", "b"], val=(scores, y), scalable=True)
    assert cal.temperature == 1.0 and cal.record["separable"] and not cal.record["fitted"]
    assert cal.record["val_nll_after"] == cal.record["val_nll_before"]


def test_auc_and_ap_equal_sklearns():
    logits, y = drawn(n=300, seed=2, scale=1.0)
    probs = softmax(logits, axis=1)
    ranked, left_out = calibration.threshold_free(probs, y, CLASSES)
    assert left_out == []
    for i, c in enumerate(CLASSES):
        assert ranked["per_class"][c]["roc_auc"] == roc_auc_score(y == i, probs[:, i])
        assert ranked["per_class"][c]["average_precision"] == average_precision_score(
            y == i, probs[:, i]
        )
    assert ranked["roc_auc_macro"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro")
    )
    assert ranked["average_precision_macro"] == pytest.approx(
        average_precision_score(label_binarize(y, classes=[0, 1, 2]), probs, average="macro")
    )


def test_a_class_missing_from_the_test_split_is_left_out_without_nan():
    logits, y = drawn(n=200, seed=3)
    y = np.where(y == 2, 0, y)  # no test window of class c
    val = drawn(n=100, seed=4)
    cal = calibration.calibrate(logits, y, classes=CLASSES, val=val, scalable=True)
    assert cal.record["auc_left_out"] == ["c"] and set(cal.per_class) == {"a", "b"}
    text = json.dumps({**cal.flat, **cal.record, "per_class": cal.per_class}, allow_nan=False)
    assert "NaN" not in text
    assert cal.flat["roc_auc_macro"] == pytest.approx(
        np.mean([cal.per_class[c]["roc_auc"] for c in ("a", "b")])
    )
    one_class = calibration.calibrate(
        logits, np.zeros(200, int), classes=CLASSES, val=None, scalable=True
    )
    assert one_class.flat["roc_auc_macro"] is None and one_class.temperature == 1.0
    json.dumps(one_class.record, allow_nan=False)


def test_a_bundles_temperature_is_read_defensively():
    assert calibration.bundle_temperature({}, file="b.json") == 1.0  # an older bundle
    assert calibration.bundle_temperature({"temperature": 2}, file="b.json") == 2.0
    for bad in (0, -1.5, "2", float("nan"), True):
        with pytest.raises(BundleError, match=r"b\.json: temperature=.* must be a positive"):
            calibration.bundle_temperature({"temperature": bad}, file="b.json")


def test_an_svms_decision_scores_are_scaled_and_platt_probabilities_are_not():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 1, 4, 4)).astype(np.float32)
    y = np.repeat(np.arange(3), 10)
    x[:, 0, 0, 0] += 2.0 * y  # a learnable class
    images = torch.from_numpy(x)
    for scores, scaled in (("decision", True), ("calibrated", False)):
        fitted = SVMClassifier(C=[1.0], gamma=["scale"], cv=2, scores=scores).fit(x, y)
        model = SVM(fitted)
        assert model.softmax_scores is scaled
        model.temperature = 2.5
        got = model.probabilities(images, device=torch.device("cpu"), amp=False)
        want = (
            softmax(fitted.decision_function(x) / 2.5, axis=1)
            if scaled
            else fitted.predict_proba(x)
        )
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert calibration.bundle_meta(model) == ({"temperature": 2.5} if scaled else {})


# --- a tiny run of the CLI with a validation split --------------------------------------------

TINY = [
    "data=folder",
    "data.sample_rate=1000",
    "data.segment.length_seconds=0.25",
    "data.segment.hop_seconds=0.125",
    "data.val_fraction=0.25",
    "models=[resnet,svm]",
    "train.epochs=3",
    "train.min_steps=0",
    "train.batch_size=8",
    "train.monitor=val_accuracy",  # keep the few validation windows apart: they fit T
    "train.amp=false",
    "features.n_fft=64",
    "features.hop_length=16",
    "features.win_length=64",
    "features.size=[16,16]",
    "svm.C=[1.0]",
    "svm.gamma=[scale]",
    "svm.cv=2",
]


def write_noisy_tones(root: Path, *, n_per_class: int = 8, rate: int = 1000) -> Path:
    """Three classes of close tones (100, 130, 160 Hz) in strong noise as WAV files under
    root/<class>/: hard enough that the models make mistakes on validation, where the
    temperature has an optimum (the conftest's tones are told apart without one)."""
    rng = np.random.default_rng(0)
    t = np.arange(rate // 2) / rate
    for label, freq in (("low", 100.0), ("mid", 130.0), ("high", 160.0)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            x = np.sin(2 * np.pi * (freq + rng.uniform(-10, 10)) * t)
            x += 2.5 * rng.standard_normal(t.size)
            sf.write(root / label / f"{label}_{i:02d}.wav", (0.1 * x).astype(np.float32), rate)
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("calibration")
    write_noisy_tones(tmp / "tones")
    proc = cli(*TINY, f"data.root={tmp / 'tones'}", f"hydra.run.dir={tmp / 'run'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp


@pytest.mark.slow
def test_the_run_fits_a_temperature_on_validation_and_reports_it(tiny_run):
    run = tiny_run / "run"
    metrics = json.loads((run / "metrics.json").read_text(), parse_constant=pytest.fail)
    assert metrics["dataset"]["n_val"] > 0
    for name in ("resnet", "svm"):
        m = metrics["models"][name]
        rec = m["calibration"]
        assert rec["fitted"] and rec["scaled"] and rec["binning"] == "equal-width"
        assert rec["val_nll_after"] <= rec["val_nll_before"] + 1e-9
        meta = json.loads((run / "models" / name / "bundle.json").read_text())
        assert meta["temperature"] == rec["temperature"] != 1.0
        assert 0.0 <= m["ece"] <= 1.0 and m["nll"] > 0 and 0.0 <= m["brier"] <= 2.0
        assert m["roc_auc_macro"] == pytest.approx(
            np.mean([m["per_class"][c]["roc_auc"] for c in ("high", "low", "mid")])
        )
    md = (run / "report.md").read_text()
    html = (run / "report.html").read_text()
    assert "## Calibration and threshold-free metrics" in md
    assert "![reliability diagrams](figures/reliability.png)" in md
    assert '<section id="calibration">' in html and 'id="auc-table"' in html
    assert 'alt="reliability diagrams"' in html.split('<section id="calibration">')[1]
    assert md.index("## Per-class precision") < md.index("## Calibration") < md.index("## Dataset")


@pytest.mark.slow
def test_predict_and_compare_apply_the_same_temperature(tiny_run):
    run = tiny_run / "run"
    bundle = load_bundle(run / "models" / "resnet")
    t = bundle.meta["temperature"]
    classify = Classifier(bundle, device=torch.device("cpu"), amp=False)
    assert classify.classifier.temperature == t
    evaluated = read_csv(run / "predictions" / "resnet.csv")
    classes = bundle.classes
    by_file: dict[str, list[dict]] = {}
    for row in evaluated:
        by_file.setdefault(row["path"], []).append(row)
    for path, rows in by_file.items():
        windows = classify.frontend.windows(Path(path), channels=classify.in_channels).x
        with torch.no_grad():
            logits = classify.model(classify.images(windows)).double().numpy()
        probs = classify(windows)
        np.testing.assert_allclose(probs, softmax(logits / t, axis=1), atol=1e-6)
        hop = classify.frontend.segmenting.hop / classify.frontend.sample_rate
        for row in rows:
            j = round(float(row["segment_start_seconds"]) / hop)
            reported = softmax(np.array([float(row[f"score_{c}"]) for c in classes]))
            np.testing.assert_allclose(probs[j], reported, atol=5e-5)  # the CSV's 6 digits


@pytest.mark.slow
def test_the_sweep_summary_gives_ece_and_auc_over_seeds(tiny_run, tmp_path):
    sweep = tmp_path / "sweep"
    for i, seed in enumerate((0, 1)):  # the run twice, as two seeds of one setting
        shutil.copytree(tiny_run / "run", sweep / str(i))
        (sweep / str(i) / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
    summary.write_summary(sweep)
    s = json.loads((sweep / "summary.json").read_text())
    cal = s["settings"][0]["calibration"]
    assert set(cal) == {"resnet", "svm"}
    assert cal["resnet"]["ece"]["n"] == 2 and cal["resnet"]["ece"]["std"] == 0.0
    assert set(cal["svm"]) == set(calibration.SWEEP_KEYS)
    md = (sweep / "summary.md").read_text()
    assert "| model | T | ECE before | ECE | NLL | AUC macro | AP macro |" in md
    assert "summary-calibration" in (sweep / "summary.html").read_text()


@pytest.mark.slow
def test_a_run_from_before_calibration_renders_without_the_section(tiny_run, tmp_path):
    from pipeline import report

    metrics = json.loads((tiny_run / "run" / "metrics.json").read_text())
    for m in metrics["models"].values():
        del m["calibration"]  # as metrics.json was written before
    assert report.write_figures(tmp_path, metrics).get("reliability") is None
    md = report.write_report(tmp_path, metrics).read_text()
    assert "Calibration" not in md and "Per-class precision" in md
    assert 'id="calibration"' not in (tmp_path / "report.html").read_text()
