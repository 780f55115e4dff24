"""The 1-D ResNet baseline on the raw window: its design, and its way through training,
bundles, predict and export like the other networks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.special import softmax

from pipeline.errors import ConfigError
from pipeline.frontend import WindowNorm
from pipeline.models.resnet1d import build_resnet1d
from tests.conftest import REPO, cli, read_csv, write_tone_dataset


def wang_parameters(channels: int, classes: int) -> int:
    """Wang et al.'s design counted by hand: per block three bias-free convolutions (kernels
    8, 5, 3) with batch norm (2 per filter), a 1x1 projection with batch norm where the
    channels change and batch norm alone where not; a linear layer on the pooled 128."""
    total, c = 0, channels
    for f in (64, 128, 128):
        total += c * f * 8 + f * f * 5 + f * f * 3 + 3 * 2 * f
        total += (c * f if c != f else 0) + 2 * f
        c = f
    return total + 128 * classes + classes


@pytest.mark.parametrize(("channels", "classes"), [(1, 2), (3, 10)])
def test_the_parameter_count_is_wang_et_als(channels, classes):
    model = build_resnet1d(num_classes=classes, in_channels=channels)
    assert sum(p.numel() for p in model.parameters()) == wang_parameters(channels, classes)
    assert wang_parameters(1, 2) == 503_106  # GunPoint's shape
    out = model(torch.randn(4, channels, 150))
    assert out.shape == (4, classes)
    # "same" padding: every block keeps the length, whatever it is
    assert model.blocks(torch.randn(2, channels, 23)).shape == (2, 128, 23)


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"kernels=\[\] must be a non-empty list"):
        build_resnet1d(num_classes=2, kernels=[])
    with pytest.raises(ConfigError, match=r"filters=\[64, 0\] must be"):
        build_resnet1d(num_classes=2, filters=[64, 0])


def test_window_norm_standardises_each_window_or_by_the_training_statistics():
    rng = np.random.default_rng(0)
    x = (5 + 3 * rng.standard_normal((8, 2, 100))).astype(np.float32)
    each = WindowNorm.fit(x, mode="window")(torch.from_numpy(x))
    assert torch.allclose(each.mean(-1), torch.zeros(8, 2), atol=1e-5)
    assert torch.allclose(each.std(-1, correction=0), torch.ones(8, 2), atol=1e-4)
    norm = WindowNorm.fit(x, mode="global")
    assert norm.mean.shape == (2, 1) and abs(float(norm.mean.mean()) - 5) < 0.1
    again = WindowNorm.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert torch.equal(again(torch.from_numpy(x)), norm(torch.from_numpy(x)))
    with pytest.raises(ConfigError, match="raw_normalize='rows' must be one of"):
        WindowNorm.fit(x, mode="rows")


@pytest.mark.slow
def test_it_trains_bundles_predicts_and_exports_like_the_other_networks(tmp_path):
    data = write_tone_dataset(tmp_path / "tones")
    run = tmp_path / "run"
    proc = cli(
        "data=folder",
        f"data.root={data}",
        "models=[resnet1d,svm]",
        "train.epochs=2",
        "train.min_steps=0",
        "train.batch_size=8",
        "features.n_fft=64",
        "features.hop_length=16",
        "features.win_length=64",
        "features.size=[16,16]",
        "features.raw_normalize=global",
        "svm.C=[1.0]",
        "svm.gamma=[scale]",
        "svm.cv=2",
        "train.amp=false",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["models"]) == {"resnet1d", "svm"}
    assert metrics["models"]["resnet1d"]["n_params"] == wang_parameters(1, 3)
    assert "resnet1d" in (run / "report.md").read_text()
    assert "resnet1d" in (run / "report.html").read_text()
    meta = json.loads((run / "models" / "resnet1d" / "bundle.json").read_text())
    assert meta["input"] == "raw" and meta["window_norm"]["mode"] == "global"
    assert json.loads((run / "models" / "svm" / "bundle.json").read_text())["input"] == "image"

    out = tmp_path / "predicted"
    proc = cli(
        "task=predict",
        f"predict.model={run / 'models' / 'resnet1d'}",
        f"predict.input={data}",
        "predict.segments=true",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    windows = {
        (r["path"], r["start_seconds"]): r for r in read_csv(out / "predictions_segments.csv")
    }
    evaluated = read_csv(run / "predictions" / "resnet1d.csv")
    assert evaluated
    for e in evaluated:  # the training run's test windows, through the bundle's front end
        w = windows[(e["path"], e["segment_start_seconds"])]
        want = softmax(np.array([float(e[f"score_{c}"]) for c in ("high", "low", "mid")]))
        np.testing.assert_allclose([float(w[c]) for c in ("high", "low", "mid")], want, atol=5e-5)

    # A file training would skip (its STFT image overflows) is refused by predict too, with
    # the same words, though the 1-D ResNet never sees an image.
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    sf.write(incoming / "huge.wav", np.full(500, 1e30, np.float32), 1000, subtype="FLOAT")
    sf.write(
        incoming / "fine.wav", 0.1 * np.sin(np.arange(500, dtype=np.float32)), 1000, subtype="FLOAT"
    )
    proc = cli(
        "task=predict",
        f"predict.model={run / 'models' / 'resnet1d'}",
        f"predict.input={incoming}",
        f"hydra.run.dir={tmp_path / 'huge'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    errors = read_csv(tmp_path / "huge" / "predictions_errors.csv")
    assert [Path(e["path"]).name for e in errors] == ["huge.wav"]
    assert "its STFT image is not finite" in errors[0]["reason"]

    onnx = tmp_path / "resnet1d.onnx"
    proc = cli(
        "task=export",
        f"export.model={run / 'models' / 'resnet1d'}",
        f"export.output={onnx}",
        f"hydra.run.dir={tmp_path / 'export'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checked with onnxruntime" in proc.stdout
    sidecar = json.loads(onnx.with_suffix(".json").read_text())
    assert sidecar["input"]["shape"] == ["batch", 1, meta["data"]["segment_samples"]]
    assert sidecar["window_norm"] == meta["window_norm"]


def test_a_constant_window_standardises_to_zeros_not_to_rounding_noise():
    norm = WindowNorm.fit(np.zeros((1, 1, 8), np.float32), mode="window")
    for level in (0.3, 1.7, 123.456):
        flat = norm(torch.full((1, 1, 500), level))
        assert torch.equal(flat, torch.zeros_like(flat))
    ramp = norm(torch.linspace(0, 1, 500).view(1, 1, 500))
    assert abs(float(ramp.std(correction=0)) - 1) < 1e-4


def test_a_models_own_training_settings_are_named_as_its_config_spells_them():
    from hydra import compose, initialize_config_dir

    from pipeline.tasks.compare import check_switches, train_settings

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("config", ["resnet1d.train.lr=-1"])
        with pytest.raises(ConfigError, match=r"^resnet1d\.train\.lr=-1 must be"):
            train_settings(cfg, "resnet1d")
        assert train_settings(cfg, "resnet").lr == 0.1  # the group's, for a model without a block
        cfg = compose("config", ["train.lr=-1"])
        with pytest.raises(ConfigError, match=r"^train\.lr=-1 must be"):
            train_settings(cfg, "resnet")
        cfg = compose("config", ["features.raw_normalize=rows"])
        with pytest.raises(ConfigError, match=r"features\.raw_normalize='rows' must be window"):
            check_switches(cfg)


def test_a_resume_fingerprint_counts_the_models_own_training_settings():
    from hydra import compose, initialize_config_dir

    from pipeline.tasks.compare import fingerprint

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        base, group_lr = compose("config"), compose("config", ["train.lr=0.5"])
        own_lr = compose("config", ["resnet1d.train.lr=0.01"])
    prints = {
        "base": fingerprint(base, "resnet1d", [], ["a"]),
        "group": fingerprint(group_lr, "resnet1d", [], ["a"]),
        "own": fingerprint(own_lr, "resnet1d", [], ["a"]),
    }
    # resnet1d's own block sets lr: the group's lr is not what it trains with
    assert prints["base"] == prints["group"]
    assert prints["own"]["train.lr"] != prints["base"]["train.lr"]
    assert fingerprint(base, "resnet", [], ["a"]) != fingerprint(group_lr, "resnet", [], ["a"])
