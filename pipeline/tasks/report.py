"""Render a finished run's report, or a sweep's summary, again from its saved files.

    python -m pipeline.run task=report run_dir=outputs/<date>/<time>
    python -m pipeline.run task=report run_dir=multirun/<date>/<time>

A run folder (it holds ``metrics.json``) gets its figures from ``metrics.json``
(the example images are kept as saved), ``report.md`` and ``report.html``; a
sweep folder (run folders below it hold ``metrics.json``) gets ``summary.json``,
``summary.md`` and ``summary.html``. Nothing is trained. :class:`pipeline.callbacks.SweepSummary`
writes the sweep summary by itself at the end of every ``-m`` run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline import report, summary
from pipeline.errors import ConfigError

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

    Raises:
        ConfigError: ``metrics.json`` cannot be read, holds no models, or was written by an
            older version of this tool (without the significance tests or the resolved config).
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
    run = metrics.get("run")
    if "significance" not in metrics or not isinstance(run, dict) or "config" not in run:
        raise ConfigError(
            f"run_dir={str(run_dir)!r}: {path} is from an older version of this tool; run it "
            "again with this version"
        )
    report.write_figures(run_dir, metrics)
    report.write_report(run_dir, metrics)
    return metrics
