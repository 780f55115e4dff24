"""Render a finished run's report, or a sweep's summary, again from its saved files.

    python -m pipeline.run task=report run_dir=outputs/<date>/<time>
    python -m pipeline.run task=report run_dir=multirun/<date>/<time>

A run folder (it holds ``metrics.json``) gets its figures from ``metrics.json``
(the example images are kept as saved), ``report.md`` and ``report.html``; a
sweep folder (run folders below it hold ``metrics.json``) gets ``summary.json``,
``summary.md`` and ``summary.html``. Nothing is trained. :class:`SweepSummary`
writes the sweep summary by itself at the end of every ``-m`` run.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline import report, summary
from pipeline.errors import ConfigError
from pipeline.metrics import file_level_predictions, pairwise_mcnemar

log = logging.getLogger(__name__)


def run(cfg: DictConfig, *, run_dir: Path) -> dict:
    """Re-render the report of ``cfg.run_dir`` (a run or a sweep folder).

    Args:
        cfg: the composed config; only ``run_dir`` is read.
        run_dir: this invocation's own Hydra folder (its log); nothing else is written there.

    Returns:
        The run's metrics, or the sweep's summary.

    Raises:
        ConfigError: ``run_dir`` is not a folder, or holds no finished run.
    """
    target = Path(cfg.run_dir)
    if not target.is_dir():
        raise ConfigError(
            f"run_dir={str(target)!r} is not a folder; give the folder of a finished run "
            "(outputs/<date>/<time>) or sweep (multirun/<date>/<time>)"
        )
    if (target / "metrics.json").is_file():
        metrics = rerender_run(target)
        print(report.summary_table(metrics))
        print(f"report: {target / 'report.md'} and {target / 'report.html'}")
        return metrics
    path = summary.write_summary(target)
    if path is None:
        raise ConfigError(
            f"run_dir={str(target)!r} holds no metrics.json, nor do the folders below it; give "
            "the folder of a finished run (outputs/<date>/<time>) or sweep (multirun/<date>/<time>)"
        )
    print(f"sweep summary: {path} and {path.with_suffix('.html')}")
    return json.loads((target / "summary.json").read_text(encoding="utf-8"))


def rerender_run(run_dir: Path) -> dict:
    """Figures, ``report.md`` and ``report.html`` of one run from its saved files.

    Runs written before the significance tests existed get them from
    ``predictions/<model>.csv``; runs written before ``metrics.json`` held the
    resolved config show ``.hydra/config.yaml`` as saved.

    Raises:
        ConfigError: ``metrics.json`` cannot be read or holds no models.
    """
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(metrics, dict) or not metrics.get("models"):
            raise ValueError("no models")
    except (ValueError, OSError) as err:
        raise ConfigError(
            f"run_dir={str(run_dir)!r}: metrics.json is not a run's metrics ({err}); give the "
            "folder of a run the pipeline finished, or run it again"
        ) from None
    if "significance" not in metrics:
        metrics["significance"] = significance_from_predictions(run_dir, list(metrics["models"]))
    config_yaml = None
    saved = run_dir / ".hydra" / "config.yaml"
    if "config" not in metrics.get("run", {}) and saved.is_file():
        config_yaml = saved.read_text(encoding="utf-8")
    report.write_figures(run_dir, metrics)
    report.write_report(run_dir, metrics, config_yaml=config_yaml)
    return metrics


def significance_from_predictions(run_dir: Path, names: list[str]) -> list[dict]:
    """McNemar's tests from ``predictions/<model>.csv`` ([] unless every model's file is there).

    Raises:
        ConfigError: the files do not list the same test items in the same order.
    """
    rows = {}
    for name in names:
        path = run_dir / "predictions" / f"{name}.csv"
        if not path.is_file():
            log.warning("no %s: the report shows no significance tests", path)
            return []
        with open(path, newline="", encoding="utf-8") as f:
            rows[name] = list(csv.DictReader(f))
    items = {n: [(r["path"], r["segment_start_seconds"], r["true"]) for r in v]
             for n, v in rows.items()}  # fmt: skip
    first = names[0]
    for name in names[1:]:
        if items[name] != items[first]:
            raise ConfigError(
                f"run_dir={str(run_dir)!r}: predictions/{name}.csv and predictions/{first}.csv "
                "list different test items; they must come from the same run"
            )
    truth = np.array([r["true"] for r in rows[first]])
    paths = [r["path"] for r in rows[first]]
    if len(set(paths)) == len(paths):
        return pairwise_mcnemar(truth, {n: np.array([r["predicted"] for r in v])
                                        for n, v in rows.items()})  # fmt: skip
    # Files cut into windows: the test counts files, as the run itself does.
    _, record = np.unique(paths, return_inverse=True)
    predicted = {}
    for name, v in rows.items():
        classes = [k[len("score_") :] for k in v[0] if k.startswith("score_")]
        scores = np.array([[float(r[f"score_{c}"]) for c in classes] for r in v])
        y = np.array([classes.index(t) for t in truth])
        y_files, predicted[name] = file_level_predictions(scores, y, record)
    return pairwise_mcnemar(y_files, predicted, unit="files")


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write the sweep summary into the sweep folder.

    Registered in ``conf/config.yaml`` under ``hydra.callbacks``. Sweeps of tasks that
    write no ``metrics.json`` (predict, export) are left alone.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        if not sweep_dir.is_dir():
            return
        path = summary.write_summary(sweep_dir)
        if path is not None:
            print(f"sweep summary: {path} and {path.with_suffix('.html')}")
