"""Experiment tracking: follow a run live in TensorBoard or MLflow (``logger=...``).

A tracker receives the run's resolved configuration, every epoch's history row of every
network as it is recorded (the rows metrics.json's ``histories`` hold), the final test
figures of every model and, for MLflow, the run's report, metrics.json and bundles as
artifacts. The figures have one name in both tools::

    train/loss  train/accuracy  val/loss  val/accuracy  lr  images_per_second   (per epoch)
    test/accuracy  test/macro_f1  test/n_params ...                          (once, step 0)

TensorBoard keeps one subfolder per model (``<log_dir>/<model>/``, so its charts overlay
the models); MLflow prefixes each key with the model (``resnet/val/accuracy``), steps are
epochs. :class:`NullTracker` (``logger=none``, the default) does nothing and imports
nothing; the libraries are imported only when their tracker is built. Under torchrun only
rank 0 logs: the others get a :class:`NullTracker`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("none", "tensorboard", "mlflow")
EXPERIMENT = "stft-resnet-pipeline"
# The modules each tracker needs, with the optional extra that installs them: MLflow's local
# store is an sqlite file (MLflow 3 refuses a plain folder store unless told to), which
# mlflow-skinny reads and writes through SQLAlchemy and Alembic.
NEEDS = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow",)}
NEEDS_SQLITE = ("sqlalchemy", "alembic")
# The run's files MLflow keeps as artifacts (the figures are embedded in report.html).
ARTIFACTS = ("report.html", "metrics.json", "models")
MLFLOW_BATCH = 100  # MLflow's limit of parameters per log_batch call
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


class Tracker(Protocol):
    """Where a run's figures go as it runs. Used as a context manager, it closes on exit,
    marking the run failed (an error) or killed (Ctrl-C)."""

    def log_config(self, config: dict) -> None:
        """The run's resolved configuration (a plain, nested dict)."""

    def log_epoch(self, model: str, row: dict) -> None:
        """One epoch's history row of network ``model`` (see :func:`epoch_figures`)."""

    def log_metrics(self, metrics: dict) -> None:
        """The final figures: metrics.json's contents (``models``: {name: test figures})."""

    def log_artifacts(self, run_dir: Path) -> None:
        """The run's report, metrics.json and bundles, where the tracker keeps files."""

    def close(self, status: str = FINISHED) -> None:
        """Flush and end the run with ``status`` (FINISHED, FAILED or KILLED)."""


class _Closing:
    """Close on leaving a ``with`` block, with the status its exit implies."""

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            status = FINISHED
        else:
            status = KILLED if issubclass(kind, KeyboardInterrupt) else FAILED
        self.close(status)


def epoch_figures(row: dict) -> dict[str, float]:
    """The tracked figures of one history row (:func:`pipeline.fit.fit`'s ``history``):
    losses, accuracies (1 - error), learning rate and throughput; missing and non-finite
    ones left out."""
    names = {
        "train_loss": "train/loss",
        "val_loss": "val/loss",
        "lr": "lr",
        "images_per_second": "images_per_second",
    }
    figures = {tag: float(row[key]) for key, tag in names.items() if _is_figure(row.get(key))}
    for split in ("train", "val"):
        error = row.get(f"{split}_error")
        if _is_figure(error):
            figures[f"{split}/accuracy"] = 1.0 - float(error)
    return figures


def result_figures(result: dict) -> dict[str, float]:
    """The numbers of one model's entry in metrics.json's ``models`` (accuracy, macro_f1,
    n_params, train_seconds, ...) as ``test/<key>``; lists and nested sections left out."""
    return {f"test/{k}": float(v) for k, v in result.items() if _is_figure(v)}


def _is_figure(value: Any) -> bool:
    """A finite number (an empty validation split's NaN loss is no point on a chart)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` as ``{"train.lr": "0.1"}`` (lists kept whole)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class NullTracker(_Closing):
    """``logger=none``: tracks nothing."""

    def log_config(self, config: dict) -> None:
        pass

    def log_epoch(self, model: str, row: dict) -> None:
        pass

    def log_metrics(self, metrics: dict) -> None:
        pass

    def log_artifacts(self, run_dir: Path) -> None:
        pass

    def close(self, status: str = FINISHED) -> None:
        pass


class TensorBoardTracker(_Closing):
    """Event files for TensorBoard: one :class:`~torch.utils.tensorboard.SummaryWriter` per
    model under ``log_dir`` (``log_dir/<model>/``), the configuration as text in ``log_dir``.

    Args:
        log_dir: the folder ``tensorboard --logdir`` is pointed at.
    """

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._make = SummaryWriter
        self._writers: dict[str, Any] = {}

    def _writer(self, model: str):
        if model not in self._writers:
            self._writers[model] = self._make(log_dir=str(self.log_dir / model))
        return self._writers[model]

    def log_config(self, config: dict) -> None:
        import yaml

        text = yaml.safe_dump(config, sort_keys=False)
        # Indented four spaces: a code block in TensorBoard's Markdown.
        self._writer("").add_text("config", "\n".join("    " + line for line in text.splitlines()))
        self._writer("").flush()

    def log_epoch(self, model: str, row: dict) -> None:
        writer = self._writer(model)
        for tag, value in epoch_figures(row).items():
            writer.add_scalar(tag, value, global_step=int(row["epoch"]))
        writer.flush()  # seen live, not at the writer's next two-minute flush

    def log_metrics(self, metrics: dict) -> None:
        for name, result in metrics.get("models", {}).items():
            writer = self._writer(name)
            for tag, value in result_figures(result).items():
                writer.add_scalar(tag, value, global_step=0)
            writer.flush()

    def log_artifacts(self, run_dir: Path) -> None:
        """TensorBoard keeps no files: the run folder holds them."""

    def close(self, status: str = FINISHED) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class MLflowTracker(_Closing):
    """One MLflow run: parameters (the configuration), metrics per model and artifacts.

    Args:
        tracking_uri: the store or server (``sqlite:///path/mlflow.db``, ``http://host:5000``).
        experiment: the experiment's name; created when the store lacks it.
        run_name: the run's name in the MLflow UI.
        artifact_location: where a new experiment keeps its files; None: the store decides.
        tags: the run's tags.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str = EXPERIMENT,
        run_name: str | None = None,
        artifact_location: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(experiment, artifact_location=artifact_location)
        )
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags or {})
        self.run_id = run.info.run_id
        self._open = True

    def log_config(self, config: dict) -> None:
        params = sorted(flatten(config).items())
        for i in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=self._params(params[i : i + MLFLOW_BATCH]))
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log_epoch(self, model: str, row: dict) -> None:
        self._log(model, epoch_figures(row), step=int(row["epoch"]))

    def log_metrics(self, metrics: dict) -> None:
        for name, result in metrics.get("models", {}).items():
            self._log(name, result_figures(result), step=0)

    def log_artifacts(self, run_dir: Path) -> None:
        for name in ARTIFACTS:
            path = Path(run_dir) / name
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=name)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str = FINISHED) -> None:
        if self._open:
            self.client.set_terminated(self.run_id, status=status)
            self._open = False

    def _log(self, model: str, figures: dict[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"{model}/{tag}", value, now, step) for tag, value in figures.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    @staticmethod
    def _params(items: list[tuple[str, str]]) -> list:
        from mlflow.entities import Param

        return [Param(key, value) for key, value in items]


def open_tracker(
    name: str = "none",
    *,
    run_dir: Path,
    rank: int = 0,
    log_dir: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = EXPERIMENT,
    run_name: str | None = None,
) -> Tracker:
    """The tracker ``name`` of one run (the ``logger`` config group's settings).

    Args:
        name: none, tensorboard or mlflow.
        run_dir: the run folder; the default stores live under it.
        rank: this process's rank; all but rank 0 get a :class:`NullTracker`.
        log_dir: TensorBoard's folder; None: ``run_dir/tensorboard``. A given folder is
            shared by runs: this one writes into ``log_dir/<run_name>/``.
        tracking_uri: MLflow's store or server; None: ``sqlite:///run_dir/mlruns/mlflow.db``
            with the artifacts in ``run_dir/mlruns/artifacts``.
        experiment: MLflow's experiment name.
        run_name: the run's name; None: the run folder's last two parts (date/time).

    Raises:
        ConfigError: ``name`` is not a tracker, or its package is not installed (checked on
            every rank, before any file is read).
    """
    check_installed(name, tracking_uri=tracking_uri)
    if name == "none" or rank != 0:
        return NullTracker()
    run_dir = Path(run_dir)
    run_name = run_name or f"{run_dir.parent.name}/{run_dir.name}"
    if name == "tensorboard":
        folder = run_dir / "tensorboard" if log_dir is None else Path(log_dir) / run_name
        root = folder if log_dir is None else log_dir
        log.info("tracking: TensorBoard event files in %s (tensorboard --logdir %s)", folder, root)
        return TensorBoardTracker(folder)
    tracking_uri, artifact_location = mlflow_store(tracking_uri, run_dir=run_dir)
    tracker = MLflowTracker(
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        artifact_location=artifact_location,
        tags={"run_dir": str(run_dir.resolve())},
    )
    log.info(
        "tracking: MLflow run %s in %s (mlflow ui --backend-store-uri %s)",
        tracker.run_id,
        tracking_uri,
        tracking_uri,
    )
    return tracker


def mlflow_store(tracking_uri: str | None, *, run_dir: Path) -> tuple[str, str | None]:
    """The MLflow store of a run and where a new experiment in it keeps its artifacts.

    None is the run's own sqlite file, ``run_dir/mlruns/mlflow.db``, with the artifacts in
    ``run_dir/mlruns/artifacts``; an sqlite file elsewhere keeps them in ``mlartifacts/``
    beside it (MLflow's default, ``./mlruns``, is the working folder's); a server decides.
    """
    if tracking_uri is None:
        store = run_dir.resolve() / "mlruns"
        store.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return tracking_uri, (db.parent / "mlartifacts").as_uri()
    return tracking_uri, None


def check_installed(name: str, *, tracking_uri: str | None = None) -> None:
    """Refuse a tracker that is not one, or whose package is missing, naming the extra.

    Raises:
        ConfigError: ``logger=<name>`` cannot run here.
    """
    if name not in KINDS:
        raise ConfigError(f"logger={name!r} must be one of {list(KINDS)}")
    needed = NEEDS.get(name, ())
    if name == "mlflow" and (tracking_uri is None or tracking_uri.startswith("sqlite:")):
        needed += NEEDS_SQLITE
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"logger={name} needs {' and '.join(missing)} (not installed): "
            f"pip install -e '.[{name}]', or set logger=none"
        )
