"""``+experiment=degradation``: plain nets against ResNets over depth, read back by the sweep
summary as the paper's Fig. 6, a table and one sentence computed from the runs."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipeline import degradation
from pipeline.models.base import build
from tests.conftest import REPO, cli, write_tone_dataset

# Two depths, two seeds, one epoch each on 0.1 s windows of tones: the preset in miniature.
MINIATURE = [
    "+experiment=degradation",
    "resnet.depth=8,14",
    "seed=0,1",
    "data=folder",
    "data.sample_rate=1000",
    "data.segment.length_seconds=0.1",
    "data.segment.hop_seconds=0.1",
    "features.n_fft=64",
    "features.hop_length=16",
    "features.win_length=64",
    "features.size=[16,16]",
    "train.epochs=1",
    "train.min_steps=0",
    "train.batch_size=8",
    "train.amp=false",
    "device=cpu",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """The miniature, run once with no -m: the preset makes it a multirun itself."""
    tmp = tmp_path_factory.mktemp("degradation")
    root = write_tone_dataset(tmp / "tones", n_per_class=8)
    out = tmp / "sweep"
    proc = cli(*MINIATURE, f"data.root={root}", f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def run_figures(sweep: Path) -> dict[tuple[str, int], list[dict]]:
    """Per (kind, depth): each run's last-epoch training error, test error and parameters,
    read from the runs' own metrics.json."""
    found: dict[tuple[str, int], list[dict]] = {}
    for path in sorted(sweep.glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        config = metrics["run"]["config"]
        for name, kind in (("resnet", "residual"), ("plain_cnn", "plain")):
            found.setdefault((kind, config[name]["depth"]), []).append(
                {
                    "train": metrics["histories"][name][-1]["train_error"],
                    "test": 1 - metrics["models"][name]["accuracy"],
                    "params": metrics["models"][name]["n_params"],
                    "shortcut": config[name]["shortcut"],
                }
            )
    return found


def test_the_miniature_summary_has_the_figure_and_a_table_that_agrees_with_the_runs(sweep):
    section = json.loads((sweep / "summary.json").read_text())["degradation"]
    runs = run_figures(sweep)
    assert sorted(runs) == [("plain", 8), ("plain", 14), ("residual", 8), ("residual", 14)]
    assert section["depths"] == [8, 14]
    assert section["shortcuts"] == ["A"]
    for row in section["rows"]:
        mine = runs[(row["kind"], row["depth"])]
        assert row["n"] == len(mine) == 2
        assert row["train_error"]["mean"] == pytest.approx(np.mean([r["train"] for r in mine]))
        assert row["test_error"]["mean"] == pytest.approx(np.mean([r["test"] for r in mine]))
        assert row["test_error"]["std"] == pytest.approx(np.std([r["test"] for r in mine], ddof=1))
    for depth in (8, 14):  # option A: a pair has exactly the same parameters
        assert {r["params"] for r in runs[("plain", depth)] + runs[("residual", depth)]} == {
            section["table"][[8, 14].index(depth)]["plain"]["n_params"]
        }
    image = matplotlib.image.imread(sweep / "figures" / "degradation.png")
    assert image.shape[0] > 200 and image.shape[1] > 400
    gaps = {int(d): g for d, g in section["gaps"].items()}
    assert section["verdict"] == degradation.verdict(section["rises"]) + (
        degradation.pairs_sentence(gaps)
    )
    for t in section["table"]:
        want = t["plain"]["train_error"]["mean"] - t["residual"]["train_error"]["mean"]
        assert gaps[t["depth"]] == pytest.approx(want)

    md = (sweep / "summary.md").read_text()
    assert section["verdict"] in md
    assert "](figures/degradation.png)" in md
    for t in section["table"]:
        cells = [
            degradation.pct(t[k][e])
            for k in ("plain", "residual")
            for e in ("train_error", "test_error")
        ]
        assert f"| {t['depth']} | " + " | ".join(cells) + " |" in md
    html = (sweep / "summary.html").read_text()
    assert html.count("data:image/png;base64,") == 2  # the accuracy bars and the curves
    assert 'id="degradation"' in html


def test_a_pair_starts_from_the_same_weights_with_option_a_shortcuts():
    conf = REPO / "conf" / "model"
    resnet = OmegaConf.merge(OmegaConf.load(conf / "resnet.yaml"), {"shortcut": "A", "depth": 14})
    plain = OmegaConf.merge(
        OmegaConf.load(conf / "plain_cnn.yaml"),
        {"arch": "cifar", "depth": 14, "width": 1.0, "shortcut": "A", "stem": "small"},
    )
    a = build(resnet, name="resnet", n_classes=3, in_channels=1, seed=7).fitted.state_dict()
    b = build(plain, name="plain_cnn", n_classes=3, in_channels=1, seed=7).fitted.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def fake_runs(train: dict[tuple[str, int], list[float]]) -> list[dict]:
    """Sweep runs as :func:`pipeline.summary.read_runs` gives them, with the given final
    training errors per (kind, depth) and one value per seed."""
    runs = []
    depths = sorted({d for _, d in train})
    seeds = len(next(iter(train.values())))
    for depth in depths:
        for seed in range(seeds):
            models, histories, config = {}, {}, {}
            for name, kind in (("resnet", "residual"), ("plain_cnn", "plain")):
                err = train[(kind, depth)][seed]
                models[name] = {"accuracy": 0.9, "n_params": 1000 * depth}
                histories[name] = [
                    {"epoch": 1, "train_error": 0.5, "val_error": 0.5},
                    {"epoch": 2, "train_error": err, "val_error": None},
                ]
                config[name] = {"depth": depth, "residual": kind == "residual", "shortcut": "A"}
            metrics = {"models": models, "histories": histories, "run": {"config": config}}
            runs.append({"dir": f"{depth}-{seed}", "seed": seed, "metrics": metrics})
    return runs


@pytest.mark.parametrize(
    ("plain_deep", "resnet_deep", "opening"),
    [
        (0.20, 0.03, "Degradation appears and the shortcuts remove it"),
        (0.20, 0.20, "Training error rises with depth for both kinds"),
        (0.05, 0.20, "The effect is reversed here"),
        (0.055, 0.045, "Degradation did not appear in this run"),
    ],
)
def test_the_sentence_follows_the_numbers(plain_deep, resnet_deep, opening):
    runs = fake_runs(
        {
            ("plain", 20): [0.05, 0.05],
            ("plain", 56): [plain_deep, plain_deep],
            ("residual", 20): [0.05, 0.05],
            ("residual", 56): [resnet_deep, resnet_deep],
        }
    )
    section = degradation.degradation(runs)
    assert section["verdict"].startswith(opening)
    assert f"{100 * plain_deep:.1f}% at 56" in section["verdict"]
    assert section["curves"]["plain"]["56"]["val"] is None  # a run without validation figures
    assert section["curves"]["plain"]["56"]["train"] == [0.5, plain_deep]


def test_spread_over_seeds_is_not_called_a_rise():
    runs = fake_runs(
        {
            ("plain", 20): [0.02, 0.10],
            ("plain", 56): [0.05, 0.15],  # +4 points, but the seeds differ by 7 to 10
            ("residual", 20): [0.05, 0.05],
            ("residual", 56): [0.05, 0.05],
        }
    )
    section = degradation.degradation(runs)
    assert not section["rises"]["plain"]["rises"]
    assert section["verdict"].startswith("Degradation did not appear")


def test_a_sweep_without_both_kinds_at_two_depths_has_no_section():
    runs = fake_runs({("plain", 20): [0.1], ("residual", 20): [0.1]})
    assert degradation.degradation(runs) is None
    for r in runs:
        del r["metrics"]["models"]["plain_cnn"]
    assert (
        degradation.degradation(runs + fake_runs({("plain", 56): [0.1], ("residual", 56): [0.1]}))
        is None
    )


def test_the_pairs_sentence_compares_each_depth():
    assert degradation.pairs_sentence({20: 0.2, 56: 0.3}) == (
        " At every depth the plain net's final training error is above its ResNet twin's, by "
        "20.0 to 30.0 points."
    )
    assert "at 56 layers only" in degradation.pairs_sentence({20: 0.0, 56: 0.3})
    assert "At no depth" in degradation.pairs_sentence({20: 0.0, 56: -0.1})
    assert degradation.pairs_sentence({}) == ""
