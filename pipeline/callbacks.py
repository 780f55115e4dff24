"""Hydra callbacks, registered in ``conf/config.yaml`` under ``hydra.callbacks``.

Hydra imports this module before every run, so it imports nothing heavy at the top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write the sweep summary into the sweep folder.

    Registered in ``conf/config.yaml`` under ``hydra.callbacks``. Sweeps of tasks that
    write no ``metrics.json`` (predict, export) are left alone. After an Optuna search
    (``-m hparams_search=...``) it runs once the sweeper has written
    ``optimization_results.yaml``, which the summary compares with its own best trial.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        if not sweep_dir.is_dir():
            return
        from pipeline import summary  # torch and scikit-learn: loaded when a sweep ends, not
        # before every run (Hydra builds its callbacks before a bad setting can be refused)

        path = summary.write_summary(sweep_dir)
        if path is not None:
            print(f"sweep summary: {path} and {path.with_suffix('.html')}")
