"""Shift-aware evaluation: evaluate.adapt_bn=auto adapts the networks when, and only when,
the test split holds groups (conditions) that training never saw."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from pipeline.adapt import GENERAL_ADVICE, decide, suggest_groups

REPO = Path(__file__).resolve().parents[1]
GROUPS = "data.group_regex='^[a-z]+_([ab])_'"


def write_conditions(root: Path, *, rate: int = 1000, n: int = 8) -> Path:
    """Three tone classes recorded in two conditions: ``a`` as is, ``b`` six times louder
    through a first-order high-pass tilt; root/<class>/<class>_<condition>_<i>.wav."""
    rng = np.random.default_rng(5)
    t = np.arange(rate // 2) / rate
    for condition, gain, tilt in (("a", 1.0, 0.0), ("b", 6.0, 0.9)):
        for label, freq in (("low", 60.0), ("mid", 180.0), ("high", 350.0)):
            (root / label).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x = np.sin(2 * np.pi * (freq + rng.uniform(-15, 15)) * t)
                x = x + 0.6 * rng.standard_normal(t.size)
                if tilt:
                    x = scipy.signal.lfilter([1.0, -tilt], [1.0], x)
                sf.write(
                    root / label / f"{label}_{condition}_{i}.wav",
                    (0.05 * gain * x).astype(np.float32),
                    rate,
                    subtype="FLOAT",
                )
    return root


def cli(data: Path, run: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.run",
            "data=folder",
            f"data.root={data}",
            "data.val_fraction=0",
            "svm.C=[1.0]",
            "svm.gamma=[scale]",
            "svm.cv=2",
            "resnet.depth=8",
            "train.epochs=10",
            "train.min_steps=0",
            "progress=false",
            f"hydra.run.dir={run}",
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run / "metrics.json").read_text())


def test_auto_adapts_only_when_every_test_group_is_unseen():
    seen = {"train_groups": {"a", "b"}, "grouped": True, "split": "group"}
    assert decide("auto", test_groups={"c"}, **seen).apply
    shared = decide("auto", test_groups={"b", "c"}, **seen)
    assert not shared.apply and "also occur in training (b)" in shared.why
    none = decide("auto", train_groups={""}, test_groups={""}, grouped=False, split="random")
    assert not none.apply and none.suggestion is None and "carry no groups" in none.why
    assert not decide(False, test_groups={"c"}, **seen).apply
    assert decide("group", test_groups={"a"}, **seen).apply  # asked for: always


def test_a_group_regex_is_suggested_from_the_test_pattern_never_applied():
    names = {"train": ["97_0.mat", "98_1.mat"], "test": ["99_3.mat"]}
    suggested = suggest_groups("regex", test_regex=r"_3\.mat$", names=names)
    assert "\"data.group_regex='_(\\d+)\\.mat$'\"" in suggested
    # takes 0-4 against 5-49: the inferred groups are disjoint, so it is offered
    takes = {"train": ["7_j_5.wav", "7_j_45.wav"], "test": ["7_j_3.wav"]}
    assert "_(\\d+)\\.wav$" in suggest_groups("regex", test_regex=r"_[0-4]\.wav$", names=takes)
    # a pattern whose parts give shared groups gets the general advice; a random split none
    same = {"train": ["x_1.wav"], "test": ["x_1_t.wav"]}
    assert suggest_groups("regex", test_regex="_t", names=same) == GENERAL_ADVICE
    assert suggest_groups("folders", test_regex=None, names={}) == GENERAL_ADVICE
    assert suggest_groups("random", test_regex=None, names={}) is None


@pytest.fixture(scope="module")
def conditions(tmp_path_factory) -> Path:
    return write_conditions(tmp_path_factory.mktemp("shift") / "data")


@pytest.fixture(scope="module")
def held_out(conditions, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("held-out") / "run"
    cli(conditions, run, GROUPS, "data.split=group", "data.test_groups=[b]", "models=[resnet,svm]")
    return run


@pytest.mark.slow
def test_a_held_out_condition_gets_adapted_figures_by_default_and_they_win(held_out):
    metrics = json.loads((held_out / "metrics.json").read_text())
    a = metrics["adaptation"]
    assert a["mode"] == "auto" and a["applied"] and a["unseen_groups"] == ["b"]
    resnet, svm = metrics["models"]["resnet"], metrics["models"]["svm"]
    assert resnet["adapted_accuracy"] > resnet["accuracy"]
    assert "adapted_accuracy" not in svm
    pairs = {(s["a"], s["b"]) for s in metrics["significance"]}
    assert ("resnet", "resnet adapted") in pairs and ("svm", "resnet adapted") in pairs
    assert a["effects"]["resnet"]["adapted"] == resnet["adapted_accuracy"]
    assert (held_out / "predictions" / "resnet_adapted.csv").is_file()
    report = (held_out / "report.md").read_text()
    assert "| model | accuracy | adapted acc. |" in report
    assert "The test split holds groups never seen in training (b): each network" in report
    assert (
        f"Adaptation raised resnet's accuracy from {resnet['accuracy']:.4f} to "
        f"{resnet['adapted_accuracy']:.4f}"
    ) in report
    html = (held_out / "report.html").read_text()
    assert "adapted acc." in html and "never seen in training (b)" in html


@pytest.mark.slow
def test_predict_advises_adaptation_when_its_input_holds_only_unseen_groups(
    held_out, conditions, tmp_path
):
    unseen = tmp_path / "b"
    for path in conditions.rglob("*_b_*.wav"):
        (unseen / path.parent.name).mkdir(parents=True, exist_ok=True)
        (unseen / path.parent.name / path.name).write_bytes(path.read_bytes())
    args = [
        sys.executable,
        "-m",
        "pipeline.run",
        "task=predict",
        "progress=false",
        f"predict.model={held_out / 'models' / 'resnet'}",
        f"hydra.run.dir={tmp_path / 'p'}",
    ]
    proc = subprocess.run(
        [*args, f"predict.input={unseen}"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "never occurred in this model's training; predict.adapt_bn=group" in proc.stdout
    proc = subprocess.run(
        [*args, f"predict.input={conditions}", "predict.overwrite=true"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "never occurred" not in proc.stdout  # a's were trained on


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ([GROUPS], "the test groups also occur in training (a, b)"),  # a random split
        ([GROUPS, "data.split=group", "data.test_groups=[b]", "evaluate.adapt_bn=false"], None),
        (["data.split=regex", "data.test_regex=_b_"], "data.group_regex='_([A-Za-z0-9]+)_'"),
    ],
)
def test_no_adaptation_without_an_unseen_group_or_when_turned_off(
    conditions, tmp_path, extra, says
):
    metrics = cli(conditions, tmp_path / "run", "models=[svm]", *extra)
    assert not metrics["adaptation"]["applied"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "adapted acc." not in report
    if says is None:
        assert "test-time adaptation" not in report
    else:
        assert "No test-time adaptation (`evaluate.adapt_bn=auto`)" in report and says in report
