"""MiniRocket: fits, saves without pickle, loads to the same scores, and runs through the CLI
like the SVM; without aeon, one line names the extra."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio

from pipeline.models.minirocket import (
    TRUSTED_TYPES,
    MiniRocketClassifier,
    load_minirocket,
    save_minirocket,
)
from tests.conftest import read_csv, write_tone_dataset

REPO = Path(__file__).resolve().parents[1]


def windows(n: int = 36, channels: int = 2, length: int = 120, seed: int = 0):
    """Three classes of noisy sines at different frequencies, (n, channels, length)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    t = np.arange(length)
    x = np.sin(2 * np.pi * (0.02 + 0.05 * y)[:, None, None] * t) + 0.3 * rng.standard_normal(
        (n, channels, length)
    )
    return x.astype(np.float32), y


def test_it_fits_saves_without_pickle_and_loads_to_the_same_scores(tmp_path):
    x, y = windows()
    model = MiniRocketClassifier(n_kernels=840, random_state=0).fit(x, y)
    assert model.n_channels_ == 2 and model.length_ == 120 and list(model.classes_) == [0, 1, 2]
    assert (model.predict(x) == y).mean() > 0.9
    probs = model.predict_proba(x)
    assert probs.shape == (36, 3) and np.allclose(probs.sum(axis=1), 1)
    path = tmp_path / "model.skops"
    save_minirocket(model, path)
    assert set(sio.get_untrusted_types(file=path)) <= TRUSTED_TYPES
    loaded = load_minirocket(path)
    np.testing.assert_array_equal(loaded.decision_function(x), model.decision_function(x))
    # two classes: the ridge's one score becomes two columns
    binary = MiniRocketClassifier(n_kernels=84).fit(x[y < 2], y[y < 2])
    assert binary.decision_function(x[:4]).shape == (4, 2)


def test_bad_settings_are_refused_before_fitting():
    with pytest.raises(ValueError, match="n_kernels=10 must be at least 84"):
        MiniRocketClassifier(n_kernels=10)._check_params()
    with pytest.raises(ValueError, match=r"alphas=\[0\] must be null or a list of positive"):
        MiniRocketClassifier(alphas=[0])._check_params()


def cli(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = (
        f"import sys, runpy; {prelude or 'pass'}; sys.argv = ['pipeline.run', *{list(args)!r}]; "
        "runpy.run_module('pipeline.run', run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "progress=false"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_it_runs_beside_the_others_and_predict_gives_its_test_predictions(tmp_path):
    data = write_tone_dataset(tmp_path / "tones")
    run = tmp_path / "run"
    common = ["data=folder", f"data.root={data}", "minirocket.n_kernels=840", "progress=false"]
    proc = cli(
        *common,
        "models=[minirocket,svm]",
        "svm.C=[1.0]",
        "svm.gamma=[scale]",
        "svm.cv=2",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["models"]) == {"minirocket", "svm"}
    assert metrics["models"]["minirocket"]["best_params"]["alpha"] > 0
    assert any({p["a"], p["b"]} == {"minirocket", "svm"} for p in metrics["significance"])
    for report in ("report.md", "report.html"):
        assert "minirocket" in (run / report).read_text()
    meta = json.loads((run / "models" / "minirocket" / "bundle.json").read_text())
    assert meta["kind"] == "minirocket" and meta["input"] == "raw"

    out = tmp_path / "predicted"
    proc = cli(
        "task=predict",
        f"predict.model={run / 'models' / 'minirocket'}",
        f"predict.input={data}",
        "predict.segments=true",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {(r["path"], r["start_seconds"]): r for r in read_csv(out / "predictions_segments.csv")}
    evaluated = read_csv(run / "predictions" / "minirocket.csv")
    assert evaluated
    for e in evaluated:
        assert rows[(e["path"], e["segment_start_seconds"])]["predicted"] == e["predicted"]

    missing = cli(
        *common,
        "models=[minirocket]",
        f"hydra.run.dir={tmp_path / 'no-aeon'}",
        prelude="sys.modules['aeon'] = None",
    )
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert (
        'minirocket: minirocket needs aeon, which is not installed; pip install -e ".[rocket]"'
        in (missing.stdout + missing.stderr)
    )


def baselines_sentence(
    models: list[str], pairs: dict[tuple[str, str], tuple[int, int, float]]
) -> str:
    """The report's sentences on the baselines for these models and McNemar results
    {(a, b): (a_only, b_only, p_holm)}."""
    from pipeline.report import md_code, templates

    significance = [
        {"a": a, "b": b, "a_only": x, "b_only": y, "p_holm": p, "n": 100, "unit": "images"}
        for (a, b), (x, y, p) in pairs.items()
    ]
    prose = templates(html=False).get_template("_prose.j2").make_module({"code": md_code})
    return str(
        prose.baselines_note({"models": dict.fromkeys(models, {}), "significance": significance})
    )


def test_the_report_answers_both_questions_in_words():
    models = ["resnet", "svm", "resnet1d", "minirocket"]
    pairs = {
        ("resnet", "resnet1d"): (1, 9, 0.01),
        ("resnet", "svm"): (3, 2, 1.0),
        ("resnet", "minirocket"): (0, 8, 0.02),
        ("resnet1d", "svm"): (6, 0, 0.04),
        ("resnet1d", "minirocket"): (2, 2, 1.0),
        ("svm", "minirocket"): (1, 5, 0.3),
    }
    text = baselines_sentence(models, pairs)
    assert "Does the STFT image help? resnet1d beats resnet (McNemar, Holm's p = 0.01)" in text
    assert "the STFT is the wrong front end here" in text
    assert "Is a deep network needed? minirocket beats resnet (McNemar, Holm's p = 0.02)" in text
    assert "resnet1d beats svm (McNemar, Holm's p = 0.04)" in text
    assert "the other pairs of resnet, resnet1d against minirocket, svm are within chance" in text
    calm = {k: (v[0], v[1], 0.5) for k, v in pairs.items()}
    text = baselines_sentence(models, calm)
    assert "resnet and resnet1d are within chance of each other (Holm's p = 0.5)" in text
    assert "resnet and resnet1d do not differ from minirocket or svm by more than chance" in text
    assert (
        baselines_sentence(["resnet", "plain_cnn", "svm"], {("resnet", "svm"): (1, 9, 0.01)}) == ""
    )


def test_windows_shorter_than_its_kernels_are_refused_in_one_line():
    x, y = windows(length=8)
    with pytest.raises(ValueError, match="windows of 8 samples are shorter than MiniRocket's"):
        MiniRocketClassifier(n_kernels=84).fit(x, y)
