"""Hydra entry point: ``python -m pipeline.run [overrides]``. Picks the task, nothing else."""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError, Interrupted, PipelineError
from pipeline.overrides import check_overrides

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


def _check_search(cfg: DictConfig) -> str | None:
    """The ``optimized_metric`` a search (``hparams_search=...``) returns, checked before the
    task runs; None for a run that is not a trial of one.

    Raises:
        ConfigError: a metric other than a model's validation figure, a model the run does
            not train, or a task other than compare.
    """
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    from pipeline.summary import parse_metric

    model, key = parse_metric(metric)
    if cfg.task != "compare":
        raise ConfigError(
            f"optimized_metric={metric} is returned by task=compare, not task={cfg.task}; drop "
            "hparams_search for this task"
        )
    models = [cfg.models] if isinstance(cfg.models, str) else list(cfg.models)
    if model not in models:
        raise ConfigError(
            f"optimized_metric={metric} names {model!r}, which models={models} does not train; "
            f"add it to models or name one of them, e.g. optimized_metric={models[0]}/{key}"
        )
    return str(metric)


def _objective(metrics: dict, metric: str) -> float | None:
    """What a trial returns to the sweeper: ``metric`` in its metrics (None off rank 0)."""
    from pipeline.summary import objective

    if not metrics:  # ranks other than 0 under torchrun return nothing
        return None
    value = objective(metrics, metric)
    if value is None:
        raise ConfigError(
            f"optimized_metric={metric}: the run has no such validation figure; it needs "
            "validation windows (data.val_fraction above 0, or data.val_groups)"
        )
    return value


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run the task ``cfg.task`` in Hydra's run folder.

    Returns:
        In a search (``-m hparams_search=...``), the validation figure ``optimized_metric``
        names, which Hydra's sweeper optimises; otherwise None.
    """
    for handler in logging.getLogger().handlers:
        handler.addFilter(_escape_undecodable)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        try:
            metric = _check_search(cfg)
            result = _task(cfg.task)(cfg, run_dir=run_dir)
            return _objective(result, metric) if metric else None
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
    except KeyboardInterrupt as err:
        log.error("%s", _interrupted(err, run_dir))
        raise SystemExit(130) from None


def _escape_undecodable(record: logging.LogRecord) -> bool:
    """Escape the undecodable bytes of a file name (held as surrogates) in a log line, which
    the console and run.log could not encode otherwise."""
    message = record.getMessage()
    escaped = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if escaped != message:
        record.msg, record.args = escaped, ()
    return True


def _interrupted(err: KeyboardInterrupt, run_dir: Path) -> str:
    """What Ctrl-C stopped and, when a checkpoint holds the finished epochs, how to go on."""
    what = str(err) if isinstance(err, Interrupted) else "stopped by Ctrl-C"
    if not (isinstance(err, Interrupted) and err.resumable):
        return what
    args = [
        shlex.quote(a)
        for a in sys.argv[1:]
        if a.split("=")[0] not in ("train.resume", "hydra.run.dir")
    ]
    command = " ".join(
        ["python -m pipeline.run", *args, "train.resume=true", f"hydra.run.dir={run_dir}"]
    )
    return f"{what}; its last finished epoch is saved: resume with\n  {command}"


def _end_without_teardown(status: list[int]) -> None:
    """End the process with ``status[0]`` once every other exit handler has run, skipping
    the interpreter's teardown: freeing PyTorch's modules took 1 to 2 s after every command.

    Registered before the task imports anything that registers its own handlers, so it
    runs after all of theirs (last in, first out); logging is flushed here, since its
    handler was registered earlier still.
    """
    if not status:  # an exception other than SystemExit: the usual exit and traceback
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status[0])


def _exit_status(code) -> int:
    """The status Python gives ``SystemExit(code)``."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


if __name__ == "__main__":
    status: list[int] = []
    atexit.register(_end_without_teardown, status)
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        status.append(2)
        raise SystemExit(2) from None
    try:
        main()
    except SystemExit as stop:
        status.append(_exit_status(stop.code))
        raise
    status.append(0)
