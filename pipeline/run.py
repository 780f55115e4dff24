"""Hydra entry point: ``python -m pipeline.run [overrides]``. Picks the task, nothing else."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("pipeline")


CONF = Path(__file__).resolve().parents[1] / "conf"


def _task(name: str):
    """``run(cfg, *, run_dir)`` of ``pipeline/tasks/<name>.py``, one per ``conf/task/*.yaml``."""
    names = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
    if name not in names:
        raise ConfigError(f"task={name!r} must be one of {names}")
    return importlib.import_module(f"pipeline.tasks.{name}").run


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        try:
            _task(cfg.task)(cfg, run_dir=run_dir)
        finally:
            _leave_process_group()
    except PipelineError as err:
        log.error("%s", err)
        raise SystemExit(2) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        log.error("%s: %s; set it on the command line, e.g. %s=<value>", key, reason, key)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
