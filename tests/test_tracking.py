"""Experiment tracking: a tiny run with logger=tensorboard and logger=mlflow, read back with each
library's own reader and matched against metrics.json; the trackers' rules on their own."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline import tracking
from pipeline.errors import ConfigError
from pipeline.tracking import NullTracker, epoch_figures, open_tracker, result_figures
from tests.conftest import write_tone_dataset

REPO = Path(__file__).resolve().parents[1]
# A ResNet of 8 layers at half width, two epochs, a validation split kept apart: seconds.
TINY = (
    "data=folder",
    "models=[resnet,svm]",
    "resnet.depth=8",
    "resnet.width=0.5",
    "train.epochs=2",
    "train.min_steps=0",
    "train.batch_size=8",
    "train.monitor=val_accuracy",
    "train.precise_bn=false",
    "train.amp=false",
    "features.n_fft=64",
    "features.hop_length=16",
    "features.win_length=64",
    "features.size=[16,16]",
    "svm.C=[1.0]",
    "svm.gamma=[scale]",
    "svm.cv=2",
    "progress=false",
)
# Each epoch's tracked figure and the history key it comes from (accuracies are 1 - error).
FROM_HISTORY = {
    "train/loss": ("train_loss", False),
    "train/accuracy": ("train_error", True),
    "val/loss": ("val_loss", False),
    "val/accuracy": ("val_error", True),
    "lr": ("lr", False),
}


def cli(*overrides: str, python: tuple[str, ...] = ("-m", "pipeline.run")):
    return subprocess.run(
        [sys.executable, *python, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def tracked_run(tmp_path_factory, logger: str) -> Path:
    """The run folder of a tiny comparison tracked by ``logger``."""
    tmp = tmp_path_factory.mktemp(logger)
    data = write_tone_dataset(tmp / "tones", n_per_class=10, seconds=0.3)
    run = tmp / "run"
    proc = cli(*TINY, f"data.root={data}", f"logger={logger}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run


def expected(run: Path) -> tuple[dict, dict]:
    """metrics.json's per-epoch histories and per-model test figures."""
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["histories"]["resnet"], "the tiny run trained no epoch"
    return metrics["histories"], metrics["models"]


def from_history(history: list[dict], key: str, complement: bool) -> list[float]:
    return [1 - row[key] if complement else row[key] for row in history]


@pytest.mark.slow
def test_tensorboard_holds_every_epoch_and_the_test_figures(tmp_path_factory):
    run = tracked_run(tmp_path_factory, "tensorboard")
    histories, models = expected(run)
    resnet = EventAccumulator(str(run / "tensorboard" / "resnet")).Reload()
    for tag, (key, complement) in FROM_HISTORY.items():
        events = resnet.Scalars(tag)
        assert [e.step for e in events] == [row["epoch"] for row in histories["resnet"]], tag
        want = from_history(histories["resnet"], key, complement)
        assert [e.value for e in events] == pytest.approx(want, rel=1e-6), tag
    for name in ("resnet", "svm"):
        events = EventAccumulator(str(run / "tensorboard" / name)).Reload()
        (accuracy,) = events.Scalars("test/accuracy")
        assert accuracy.value == pytest.approx(models[name]["accuracy"], rel=1e-6)
    root = EventAccumulator(str(run / "tensorboard")).Reload()
    assert "config/text_summary" in root.Tags()["tensors"]


@pytest.mark.slow
def test_mlflow_holds_the_config_every_epoch_the_test_figures_and_the_artifacts(
    tmp_path_factory,
):
    run = tracked_run(tmp_path_factory, "mlflow")
    histories, models = expected(run)
    client = MlflowClient(f"sqlite:///{run / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    (found,) = client.search_runs([experiment.experiment_id])
    run_id = found.info.run_id
    assert found.info.status == "FINISHED"
    assert found.data.params["train.epochs"] == "2"
    assert found.data.params["models"] == "['resnet', 'svm']"
    for tag, (key, complement) in FROM_HISTORY.items():
        points = client.get_metric_history(run_id, f"resnet/{tag}")
        points.sort(key=lambda m: m.step)
        assert [m.step for m in points] == [row["epoch"] for row in histories["resnet"]], tag
        want = from_history(histories["resnet"], key, complement)
        assert [m.value for m in points] == pytest.approx(want, rel=1e-9), tag
    for name in ("resnet", "svm"):
        (accuracy,) = client.get_metric_history(run_id, f"{name}/test/accuracy")
        assert accuracy.value == pytest.approx(models[name]["accuracy"], rel=1e-9)
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.html", "metrics.json", "models", "config.yaml"} <= listed
    bundles = {a.path for a in client.list_artifacts(run_id, "models")}
    assert bundles == {"models/resnet", "models/svm"}
    resnet = {a.path for a in client.list_artifacts(run_id, "models/resnet")}
    assert {"models/resnet/bundle.json", "models/resnet/weights.pt"} <= resnet


@pytest.mark.slow
def test_a_missing_package_fails_in_one_line_naming_the_extra_before_any_file_is_read(
    tmp_path,
):
    """``sys.modules['mlflow'] = None`` hides the package; the data folder is empty, so a
    message about the data would mean the files were read first."""
    empty = tmp_path / "empty"
    empty.mkdir()
    hide = (
        "import runpy, sys; sys.modules['mlflow'] = None; sys.argv[0] = 'pipeline.run'; "
        "runpy.run_module('pipeline.run', run_name='__main__')"
    )
    proc = cli(
        *TINY,
        f"data.root={empty}",
        "logger=mlflow",
        f"hydra.run.dir={tmp_path / 'run'}",
        python=("-c", hide),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line]
    assert len(errors) == 1, proc.stdout + proc.stderr
    assert "logger=mlflow needs mlflow" in errors[0]
    assert "pip install -e '.[mlflow]'" in errors[0]
    assert not (tmp_path / "run" / "mlruns").exists()


def test_missing_packages_are_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("tensorboard", "sqlalchemy") else real(name, *a),
    )
    with pytest.raises(ConfigError, match=r"logger=tensorboard needs tensorboard.*\[tensorboard\]"):
        open_tracker("tensorboard", run_dir=Path("unused"))
    with pytest.raises(ConfigError, match=r"logger=mlflow needs sqlalchemy \(not installed\)"):
        tracking.check_installed("mlflow")
    tracking.check_installed("mlflow", tracking_uri="http://localhost:5000")  # no sqlite
    with pytest.raises(ConfigError, match=r"logger='wandb' must be one of"):
        tracking.check_installed("wandb")


def test_none_and_other_ranks_track_nothing(tmp_path):
    assert isinstance(open_tracker("none", run_dir=tmp_path), NullTracker)
    assert isinstance(open_tracker("tensorboard", run_dir=tmp_path, rank=1), NullTracker)
    assert isinstance(open_tracker("mlflow", run_dir=tmp_path, rank=1), NullTracker)
    assert list(tmp_path.iterdir()) == []


def test_logger_none_imports_neither_library():
    """No module of the package imports MLflow or TensorBoard at its top: only building
    their tracker does, so ``logger=none`` costs no import."""
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            tracked = [n for n in names if n.split(".")[0] in ("mlflow", "tensorboard")]
            tracked += [n for n in names if n.startswith("torch.utils.tensorboard")]
            assert not tracked, f"{path.relative_to(REPO)} imports {tracked} at its top"


def test_epoch_figures_are_accuracies_and_skip_what_is_not_a_number():
    row = {
        "epoch": 3,
        "lr": 0.01,
        "train_loss": 0.5,
        "train_error": 0.25,
        "val_loss": float("nan"),  # an empty validation split
        "val_error": float("nan"),
        "images_per_second": 100.0,
    }
    assert epoch_figures(row) == {
        "train/loss": 0.5,
        "train/accuracy": 0.75,
        "lr": 0.01,
        "images_per_second": 100.0,
    }
    result = {"accuracy": 0.5, "n_params": 10, "per_class": {"a": 1.0}, "amp": True}
    assert result_figures(result) == {"test/accuracy": 0.5, "test/n_params": 10.0}


def test_a_shared_store_or_folder_and_a_failed_run(tmp_path):
    """``logger.tracking_uri`` and ``logger.log_dir`` put the run where they say; an error in
    the ``with`` block marks the MLflow run failed."""
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    with (
        pytest.raises(RuntimeError),
        open_tracker(
            "mlflow", run_dir=tmp_path / "2026-01-01" / "10-00-00", tracking_uri=uri
        ) as tracker,
    ):
        tracker.log_epoch("resnet", {"epoch": 1, "train_loss": 0.5})
        raise RuntimeError("stop")
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.info.run_name == "2026-01-01/10-00-00"
    assert run.data.metrics == {"resnet/train/loss": 0.5}
    experiment = MlflowClient(uri).get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert not (tmp_path / "2026-01-01").exists()  # nothing in the run folder
    shared = tmp_path / "tb"
    with open_tracker("tensorboard", run_dir=tmp_path / "d" / "t", log_dir=str(shared)) as tb:
        tb.log_epoch("resnet", {"epoch": 1, "train_loss": 0.5})
    (event,) = EventAccumulator(str(shared / "d" / "t" / "resnet")).Reload().Scalars("train/loss")
    assert (event.step, event.value) == (1, 0.5)
