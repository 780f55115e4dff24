"""Training loop for the networks: the paper's recipe by default, best epoch by validation.

The defaults follow He et al. (2015), section 4.2: SGD with momentum 0.9,
weight decay 1e-4, learning rate 0.1 divided by 10 at fixed milestones, batch
size 128. On CUDA the loop runs under automatic mixed precision (bf16 where
supported, else fp16 with a gradient scaler); channels_last memory format is
used on every device (about 2x faster convolutions on a 2-core CPU, measured).

Under ``torch.distributed`` (started by torchrun) the model is wrapped in
DistributedDataParallel, every rank draws its share of each epoch's batches from a
DistributedSampler, the global batch stays ``batch_size``, the epoch's loss and error
are summed over ranks, and only rank 0 writes the checkpoint.

The loop is small stages over one :class:`Trainer` (what training holds from step to
step): :func:`train_one_epoch` (of :func:`_train_step`), validation, :func:`select` (the
kept epoch, early stopping) and :func:`write_checkpoint`. Errors name the settings as
:class:`TrainSettings` and :func:`fit` call them (``lr=0``); the task layer renames them
to config keys (:func:`pipeline.errors.config_keys`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from pipeline import atomic
from pipeline.augment import AugmentSettings, SpecAugment, mixup
from pipeline.errors import ConfigError, Interrupted, TrainingError
from pipeline.precise_bn import precise_batchnorm
from pipeline.runtime import amp_dtype, autocast, in_format, rank_and_world
from pipeline.tracking import NullTracker, Tracker
from pipeline.values import is_number, is_whole

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine", "onecycle", "constant")
MONITORS = ("auto", "val_accuracy", "val_loss", "last")
AUTO = "auto"
# train.batch_size=auto: a quarter of the training windows within these bounds, so a small set
# takes several steps an epoch (Wang et al. 2017 and Fawaz et al. 2019 take min(n / 10, 16))
# and a mid-sized one keeps the paper's 128: on the embedded default (742 windows) a tenth,
# 74, gave the ResNet a validation accuracy of 0.775 against 128's 0.861 (3 seeds, 30 epochs;
# BENCHMARKS.md, the suite's notes).
AUTO_BATCH = (8, 128)
AUTO_BATCH_FRACTION = 4
# train.monitor=auto picks the best validation epoch only when the validation split has at
# least this many windows per class; with fewer, one window moves the score by more than the
# epochs differ, and the last epoch of the decayed schedule is kept.
MIN_VAL_PER_CLASS = 20
CLASS_WEIGHTS = (None, "balanced")


@dataclass(frozen=True)
class TrainSettings:
    """Settings of one training run (the ``train`` config group)."""

    epochs: int = 30
    batch_size: int | str = 128
    min_steps: int = 0
    max_steps: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "multistep"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    patience: int | None = None
    monitor: str = "val_accuracy"
    class_weights: str | None = None
    ema_epochs: float = 0.0
    precise_bn: bool = True
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    channels_last: bool = True
    amp: bool = True
    compile: bool = False
    resume: bool | str = False

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_lengths()
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self._read_augment()
        _check_choice("monitor", self.monitor, MONITORS)
        self._check_recipe()
        self._check_stopping()

    def _check_numbers(self) -> None:
        """The recipe's numbers are numbers in range, and its switches true or false."""
        for key, (low, high, closed) in NUMBERS.items():
            _check_number(key, getattr(self, key), low, high, closed)
        for key in FLAGS:
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(
                    f"{key}={getattr(self, key)!r} must be true or false", keys=(key,)
                )

    def _check_lengths(self) -> None:
        """Epochs and batch are positive counts, the step floor and ceiling whole numbers."""
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if key == "batch_size" and value == AUTO:
                continue
            if not is_whole(value, minimum=1):
                extra = " or auto" if key == "batch_size" else ""
                raise ConfigError(f"{key}={value!r} must be a positive integer{extra}", keys=(key,))
        for key in ("min_steps", "max_steps"):
            value = getattr(self, key)
            if value is None and key == "max_steps":
                continue
            if not is_whole(value, minimum=0):
                raise ConfigError(
                    f"{key}={value!r} must be a whole number of optimizer steps"
                    + (", or null for no ceiling" if key == "max_steps" else " (0: no floor)"),
                    keys=(key,),
                )
        if self.max_steps is not None and self.max_steps < max(1, self.min_steps):
            raise ConfigError(
                f"max_steps={self.max_steps} must be at least min_steps={self.min_steps} (and "
                "at least 1); raise it or set it to null",
                keys=("max_steps", "min_steps"),
            )

    def _read_augment(self) -> None:
        """``augment`` given as a dict (the config's form) becomes :class:`AugmentSettings`."""
        if not isinstance(self.augment, dict):
            return
        known = AugmentSettings.__dataclass_fields__
        unknown = sorted(set(self.augment) - set(known))
        if unknown:
            raise ConfigError(
                f"augment.{unknown[0]} is not an augmentation; known: {sorted(known)}",
                keys=("augment",),
            )
        object.__setattr__(self, "augment", AugmentSettings(**self.augment))

    def _check_recipe(self) -> None:
        """Milestones, class weights, schedule and label smoothing."""
        if not isinstance(self.milestones, tuple | list) or not all(
            is_number(m) for m in self.milestones
        ):
            raise ConfigError(
                f"milestones={self.milestones!r} must be a list of fractions of training in "
                "(0, 1), e.g. [0.5,0.75]",
                keys=("milestones",),
            )
        if self.class_weights not in CLASS_WEIGHTS:
            raise ConfigError(
                f"class_weights={self.class_weights!r} must be null or 'balanced'",
                keys=("class_weights",),
            )
        _check_choice("schedule", self.schedule, SCHEDULES)
        if any(not 0 < m < 1 for m in self.milestones):
            raise ConfigError(
                f"milestones={list(self.milestones)} must be fractions of training in (0, 1)",
                keys=("milestones",),
            )
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(
                f"label_smoothing={self.label_smoothing!r} must be in [0, 1)",
                keys=("label_smoothing",),
            )

    def _check_stopping(self) -> None:
        """Resuming, weight averaging and early stopping."""
        if not isinstance(self.resume, bool | str):
            raise ConfigError(
                f"resume={self.resume!r} must be true, false or the run folder to resume",
                keys=("resume",),
            )
        if not is_number(self.ema_epochs) or not self.ema_epochs >= 0:
            raise ConfigError(
                f"ema_epochs={self.ema_epochs!r} must be 0 (off) or a positive number of epochs, "
                "e.g. 2",
                keys=("ema_epochs",),
            )
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ConfigError(
                f"patience={self.patience!r} must be a positive integer or null", keys=("patience",)
            )
        if self.patience is not None and self.monitor == "last":
            raise ConfigError(
                f"patience={self.patience} stops on a monitored value, but monitor=last keeps "
                "the last epoch whatever the validation says; set monitor to val_accuracy or "
                "val_loss, or patience to null",
                keys=("patience", "monitor"),
            )


# Numbers of the recipe and the ranges they must lie in: (low, high, low included); a
# negative gradient-clipping norm reverses the gradients, a momentum above 1 diverges.
NUMBERS = {
    "lr": (0, None, False),
    "momentum": (0, 1, True),
    "weight_decay": (0, None, True),
    "gamma": (0, 1, False),
    "warmup_epochs": (0, None, True),
    "grad_clip": (0, None, False),
}
FLAGS = ("precise_bn", "channels_last", "amp", "compile")


def _check_choice(key: str, value, allowed: tuple) -> None:
    """``value`` of setting ``key`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} must be one of {list(allowed)}", keys=(key,))


def _check_number(key: str, value, low, high, closed: bool) -> None:
    """Setting ``key`` is a number in its range (``grad_clip`` may be null)."""
    if value is None and key == "grad_clip":
        return
    above = is_number(value) and (value >= low if closed else value > low)
    if not (above and (high is None or value <= high)):
        if high is None:
            rule = "a positive number" if not closed else "0 or a positive number"
        else:
            rule = f"a number in {'[' if closed else '('}{low}, {high}]"
        extra = ", or null for none" if key == "grad_clip" else ""
        raise ConfigError(f"{key}={value!r} must be {rule}{extra}", keys=(key,))


@dataclass
class FitResult:
    """What training produced.

    Attributes:
        history: one dict per epoch: epoch, lr, train_loss, train_error,
            val_loss, val_error, images_per_second.
        best_epoch: the epoch (1-based) whose weights were kept.
        train_seconds: wall time of the loop.
        plan: the batch size, steps, epochs and monitor this run resolved.
        precise_bn: what the recomputation of the batch-norm statistics did (layers,
            windows, seconds, validation accuracy before and after), or None.
    """

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    train_seconds: float = 0.0
    plan: Plan | None = None
    precise_bn: dict | None = None


@dataclass(frozen=True)
class Plan:
    """How long one run trains and what it keeps, resolved from the data's size.

    Attributes:
        batch_size: the global batch.
        steps_per_epoch: optimizer steps per pass over the training windows (per rank).
        steps: optimizer steps in all; the last epoch may stop part way.
        epochs: passes over the data, the last one possibly partial.
        monitor: the rule that picks the kept weights (``auto`` resolved).
        why: one sentence on what decided the length, for the log and the report.
    """

    batch_size: int
    steps_per_epoch: int
    steps: int
    epochs: int
    monitor: str
    why: str

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def auto_batch_size(n_train: int) -> int:
    """``train.batch_size=auto``: a quarter of ``n_train``, within :data:`AUTO_BATCH`."""
    low, high = AUTO_BATCH
    return int(min(high, max(low, n_train // AUTO_BATCH_FRACTION)))


def plan_training(
    s: TrainSettings, *, n_train: int, n_val: int = 0, n_classes: int = 1, world: int = 1
) -> Plan:
    """Resolve the batch size, the training length in optimizer steps and the monitor.

    The length is ``epochs`` passes, raised to ``min_steps`` optimizer steps for a small
    training set (42 windows at batch 10 are 5 steps an epoch: 30 epochs would be 150 steps)
    and cut to ``max_steps`` for a large one, so the schedule's milestones and warm-up,
    defined over the steps, always span a run long enough to converge and short enough to
    finish.
    """
    batch = auto_batch_size(n_train) if s.batch_size == AUTO else int(s.batch_size)
    local = max(1, batch // world)
    steps_per_epoch = max(1, math.ceil(math.ceil(n_train / world) / local))
    steps = s.epochs * steps_per_epoch
    why = f"{s.epochs} epochs of {steps_per_epoch} steps at batch {batch}"
    if steps < s.min_steps:
        steps = s.min_steps
        why = f"train.min_steps={s.min_steps}: {steps_per_epoch} steps an epoch at batch {batch}"
    if s.max_steps is not None and steps > s.max_steps:
        steps = s.max_steps
        why = f"train.max_steps={s.max_steps}: {steps_per_epoch} steps an epoch at batch {batch}"
    monitor = s.monitor
    if monitor == AUTO:
        enough = n_val >= MIN_VAL_PER_CLASS * max(1, n_classes)
        monitor = "val_accuracy" if enough else "last"
    return Plan(batch, steps_per_epoch, steps, math.ceil(steps / steps_per_epoch), monitor, why)


def _make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    # No weight decay on batch-norm parameters and biases (1-D tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": s.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum)
    return torch.optim.AdamW(groups, lr=s.lr)


class WeightAverage:
    """An exponential moving average of a network's weights and batch-norm statistics.

    After every optimisation step ``avg <- avg + (1 - d) * (w - avg)`` for every floating
    parameter and buffer, where the decay ``d = 1 - 1 / (epochs * steps_per_epoch)`` gives
    the average a horizon of ``epochs`` epochs, and ``d`` is capped at ``t / (t + 1)`` at
    the ``t``-th update (from 0), so the early average is a plain mean of the steps so
    far, without the random initial weights. Counters (``num_batches_tracked``) are copied.
    Batch-norm statistics are averaged like the weights (as timm's ``ModelEmaV2`` does)
    instead of being recomputed by an extra pass over the data.
    """

    def __init__(self, model: nn.Module, *, epochs: float, steps_per_epoch: int) -> None:
        self.decay = 1 - 1 / max(1.0, epochs * steps_per_epoch)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.steps = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, self.steps / (self.steps + 1))  # 0 at the first step
        self.steps += 1
        for avg, now in zip(_tensors(self.model), _tensors(model), strict=True):
            if avg.is_floating_point():
                avg.lerp_(now.detach(), 1 - d)
            else:
                avg.copy_(now)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = state["steps"]


def _tensors(model: nn.Module) -> list[Tensor]:
    """Every parameter and buffer, in the state dict's order (names are unique)."""
    return list(model.state_dict(keep_vars=True).values())


def _lr_factor(
    step: int, *, steps_per_epoch: int, s: TrainSettings, total: int | None = None
) -> float:
    """Learning-rate multiplier at optimisation step ``step`` (0-based) of ``total`` steps
    (default ``s.epochs * steps_per_epoch``)."""
    total = s.epochs * steps_per_epoch if total is None else total
    warmup = min(total, s.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if s.schedule == "multistep":
        return s.gamma ** sum(step >= round(m * total) for m in s.milestones)
    if s.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    if s.schedule == "onecycle":
        # torch.optim.lr_scheduler.OneCycleLR's shape: linear from lr/25 to lr over
        # the first 30 % of the steps, then cosine down to lr/25/1e4.
        rise = max(1, round(0.3 * total))
        if step < rise:
            return 1 / 25 + (1 - 1 / 25) * step / rise
        progress = (step - rise) / max(1, total - rise)
        low = 1 / 25 / 1e4
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def fit(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    settings: TrainSettings,
    device: torch.device,
    seed: int,
    progress: bool = True,
    name: str = "model",
    checkpoint: Path | None = None,
    resume: bool = False,
    fingerprint: dict[str, str] | None = None,
    tracker: Tracker | None = None,
) -> FitResult:
    """Train ``model`` in place and leave it holding the weights of its best validation epoch
    (on several processes under ``torch.distributed``, as the module's docstring says).

    Args:
        model: a network returning logits (N, n_classes).
        x_train: images (N, C, H, W), float32, on the CPU: a tensor, or an
            :class:`~pipeline.features.view.ImageView` that reads each batch from disk.
        y_train: class indices (N,), int64.
        x_val: validation images; when empty, the last epoch is kept.
        y_val: validation class indices.
        settings: the training recipe.
        device: where to train.
        seed: seeds the batch order.
        progress: show a progress bar per epoch.
        name: used in log lines.
        checkpoint: where the last state (model, optimizer, scaler, epoch, best weights,
            history) is written atomically after every epoch.
        resume: continue from ``checkpoint`` when it exists.
        fingerprint: what the weights are trained on ({setting: JSON value}), stored in the
            checkpoint; resuming refuses a checkpoint whose fingerprint differs.
        tracker: receives every epoch's history row as it is recorded
            (:mod:`pipeline.tracking`); None: nothing does.

    Raises:
        ConfigError: the checkpoint to resume is unreadable or was trained otherwise.
        TrainingError: the training loss became NaN or infinite.
        Interrupted: Ctrl-C; the checkpoint holds the last finished epoch.

    Returns:
        The per-epoch history, the best epoch and the wall time.
    """
    t = _setup(model, x_train, y_train, x_val, settings, device, seed, name, progress)
    t.tracker = tracker if tracker is not None else t.tracker
    if resume and checkpoint is not None and checkpoint.is_file():
        _resume(t, checkpoint, fingerprint)
    t.state["fingerprint"] = fingerprint
    start = time.perf_counter() - t.state["seconds"]
    _train_epochs(t, x_val, y_val, start=start, checkpoint=checkpoint)
    return _finish(t, x_val, y_val, start=start, seed=seed)


def _resume(t: Trainer, path: Path, fingerprint: dict[str, str] | None) -> None:
    """Restore ``t`` from the checkpoint ``path`` (checked against ``fingerprint``)."""
    t.state = _load_checkpoint(
        path,
        t.model,
        t.optimizer,
        t.scaler,
        t.ema,
        rank=t.rank,
        world=t.world,
        fingerprint=fingerprint,
    )
    log.info("%s: resumed from %s after epoch %d", t.name, path, t.state["epoch"])


def _train_epochs(
    t: Trainer, x_val: Tensor, y_val: Tensor, *, start: float, checkpoint: Path | None
) -> None:
    """The epochs left, each checkpointed, until the plan's last or an early stop.

    Raises:
        Interrupted: Ctrl-C, naming the epoch; resumable once an epoch is checkpointed.
    """
    try:
        for epoch in range(t.state["epoch"] + 1, t.plan.epochs + 1):
            if t.state["finished"]:
                break
            run_epoch(t, epoch, x_val, y_val, start=start)
            if checkpoint is not None:
                write_checkpoint(t, checkpoint)
    except KeyboardInterrupt:
        raise Interrupted(
            f"{t.name}: stopped by Ctrl-C in epoch {t.state['epoch'] + 1} of {t.plan.epochs}",
            resumable=checkpoint is not None and t.state["epoch"] > 0,
        ) from None


def run_epoch(t: Trainer, epoch: int, x_val: Tensor, y_val: Tensor, *, start: float) -> None:
    """Train one epoch, validate the kept weights, record the row and select; ``start`` is
    the loop's start on the :func:`time.perf_counter` clock (less the resumed seconds)."""
    row = train_one_epoch(t, epoch)
    row["val_loss"], row["val_error"] = evaluate_loss(
        t.kept, x_val, y_val, device=t.device, s=t.s, batch_size=2 * t.plan.batch_size
    )
    _record(t, row)
    select(t, row, n_val=len(x_val))
    t.state["epoch"] = epoch
    t.state["seconds"] = time.perf_counter() - start


def write_checkpoint(t: Trainer, path: Path) -> None:
    """Write ``t``'s training state to ``path`` (on rank 0; every rank gives its random states)."""
    rng = _rng_states(t.world)  # every rank's: a collective under torch.distributed
    if t.rank == 0:
        _save_checkpoint(path, t.state, t.model, t.optimizer, t.scaler, rng, t.ema)


def _finish(t: Trainer, x_val: Tensor, y_val: Tensor, *, start: float, seed: int) -> FitResult:
    """Load the kept weights into the model, recompute its batch-norm statistics where
    ``precise_bn`` is on, and gather the result."""
    s, model = t.s, t.model
    model.load_state_dict(t.state["best_state"])
    kept = _kept_phrase(t.plan.monitor, s.monitor, n_val=len(x_val))
    log.info("%s: kept epoch %d (%s)", t.name, t.state["best_epoch"], kept)
    precise = None
    if s.precise_bn:
        precise = _precise_bn(
            model,
            t.x_source,
            x_val,
            y_val,
            plan=t.plan,
            device=t.device,
            s=s,
            memory_format=t.memory_format,
            seed=seed,
            name=t.name,
        )
    return FitResult(
        history=t.state["history"],
        best_epoch=t.state["best_epoch"],
        train_seconds=time.perf_counter() - start,
        plan=t.plan,
        precise_bn=precise,
    )


@dataclass
class Trainer:
    """What one network's training holds from step to step.

    ``state`` is what a checkpoint keeps besides the model, optimizer, scaler and
    average: epoch and step counts, the best score and its weights, patience, history.
    """

    model: nn.Module
    net: nn.Module  # the model as trained: wrapped by DDP and torch.compile where on
    kept: nn.Module  # the weights validated and kept: the average when there is one
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: DistributedSampler
    ema: WeightAverage | None
    augment: SpecAugment | None
    weight: Tensor | None  # class weights of the loss
    plan: Plan
    s: TrainSettings
    device: torch.device
    memory_format: torch.memory_format
    x_source: Tensor  # the training images where batches are gathered from
    y_source: Tensor
    base_lrs: list[float]
    name: str
    progress: bool
    rank: int
    world: int
    state: dict
    tracker: Tracker = field(default_factory=NullTracker)  # rank 0's; the others' are null


def _setup(model, x_train, y_train, x_val, settings, device, seed, name, progress) -> Trainer:
    """The model on its device (DDP, compile), the plan, optimizer, scaler, sampler, average."""
    s = settings
    rank, world = rank_and_world()
    # Augmentation and mixup draw from the global generator: seeded per rank here,
    # restored from the checkpoint on resume.
    torch.manual_seed(seed * 1009 + rank)
    memory_format = torch.channels_last if s.channels_last else torch.contiguous_format
    net = _place(model, s, device=device, memory_format=memory_format, world=world)
    augment = SpecAugment(s.augment) if s.augment.any_image else None
    n_classes = int(getattr(model, "config", {}).get("num_classes", int(y_train.max()) + 1))
    plan = _plan(s, n_train=len(x_train), n_val=len(x_val), n_classes=n_classes, world=world)
    if rank == 0:
        kept = _kept_phrase(plan.monitor, s.monitor, n_val=len(x_val))
        log.info(
            "%s: %d optimizer steps (%s), %d epochs; keeps %s",
            name,
            plan.steps,
            plan.why,
            plan.epochs,
            kept,
        )
    weight = _class_weight(s, y_train, n_classes=n_classes, device=device)
    x_source = _stage(x_train, device)
    optimizer = _make_optimizer(model, s)
    use_scaler = amp_dtype(device, s.amp) == torch.float16  # bf16 needs no loss scaling
    ema = (
        WeightAverage(model, epochs=s.ema_epochs, steps_per_epoch=plan.steps_per_epoch)
        if s.ema_epochs
        else None
    )
    return Trainer(
        model=model,
        net=net,
        kept=ema.model if ema is not None else model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=use_scaler),
        sampler=DistributedSampler(
            range(len(x_train)), num_replicas=world, rank=rank, shuffle=True, seed=seed
        ),  # the same draw on every rank
        ema=ema,
        augment=augment,
        weight=weight,
        plan=plan,
        s=s,
        device=device,
        memory_format=memory_format,
        x_source=x_source,
        y_source=y_train.to(x_source.device),
        base_lrs=[g["lr"] for g in optimizer.param_groups],
        name=name,
        progress=progress,
        rank=rank,
        world=world,
        state=_fresh_state(model),
    )


def _place(model: nn.Module, s: TrainSettings, *, device, memory_format, world: int) -> nn.Module:
    """Move ``model`` to ``device`` in ``memory_format``; the module as trained (wrapped in
    DistributedDataParallel on several processes, compiled with ``compile``)."""
    model.to(device=device, memory_format=memory_format)
    net = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if s.compile:
        net = torch.compile(net)
    return net


def _plan(s: TrainSettings, *, n_train: int, n_val: int, n_classes: int, world: int) -> Plan:
    """:func:`plan_training`, where early stopping makes ``monitor=auto`` watch validation."""
    plan = plan_training(s, n_train=n_train, n_val=n_val, n_classes=n_classes, world=world)
    if s.monitor == AUTO and s.patience is not None and plan.monitor == "last":
        plan = replace(plan, monitor="val_accuracy")  # patience stops on validation
    return plan


def _class_weight(
    s: TrainSettings, y_train: Tensor, *, n_classes: int, device: torch.device
) -> Tensor | None:
    """The loss's class weights for ``class_weights=balanced`` (on ``device``), else None."""
    if s.class_weights != "balanced":
        return None
    counts = torch.bincount(y_train, minlength=n_classes).double()
    return (len(y_train) / (n_classes * counts.clamp(min=1))).float().to(device)


def _fresh_state(model: nn.Module) -> dict:
    """The training state before the first epoch (``Trainer.state``)."""
    return {
        "epoch": 0,
        "step": 0,
        "best": [-math.inf, -math.inf],
        "best_epoch": 0,
        "stale": 0,
        "history": [],
        "seconds": 0.0,
        "finished": False,
        "best_state": copy.deepcopy(model.state_dict()),
    }


def train_one_epoch(t: Trainer, epoch: int) -> dict:
    """One pass over the training images in equal batches; the epoch's row of the history
    (without validation).

    Raises:
        TrainingError: the epoch's loss is NaN or infinite.
    """
    t.net.train()
    t.sampler.set_epoch(epoch)
    # One copy of the epoch's order to where the images are: indexing with it needs no
    # host-to-device copy (and no synchronisation) per step.
    order = torch.tensor(list(iter(t.sampler))).to(t.x_source.device)
    totals = torch.zeros(3, dtype=torch.float64, device=t.device)  # loss sum, errors, seen
    seen_here = 0
    epoch_start = time.perf_counter()
    left = t.plan.steps - t.state["step"]  # the last epoch may stop part way
    # Equal batches (742 windows at 74 are ten of 74 and one of 2 otherwise): a tail of a
    # few windows gives one noisy step and batch-norm statistics of almost nothing.
    batches = torch.tensor_split(order, t.plan.steps_per_epoch)[:left]
    bar = tqdm(
        batches,
        desc=f"{t.name} {epoch}/{t.plan.epochs}",
        unit="batch",
        leave=False,
        disable=not t.progress or t.rank != 0,
    )
    for idx in bar:
        loss, errors = _train_step(t, idx)
        # Summed on the device: no host synchronisation per step.
        totals[:2] += torch.stack([loss.detach().double() * len(idx), errors.double()])
        seen_here += len(idx)
        if not bar.disable and t.state["step"] % 25 == 0:  # .item() waits for the device
            bar.set_postfix(loss=f"{totals[0].item() / seen_here:.3f}")
    totals[2] = seen_here
    if t.world > 1:
        torch.distributed.all_reduce(totals)
    loss_sum, errors, seen = totals.tolist()
    if not math.isfinite(loss_sum):
        raise TrainingError(
            f"{t.name}: the training loss became {loss_sum / seen} in epoch {epoch} of "
            f"{t.plan.epochs} (after {t.state['step']} steps); lower lr={t.s.lr}, set "
            "grad_clip=1.0, or amp=false",
            keys=("lr", "grad_clip", "amp"),
        )
    return {
        "epoch": epoch,
        "lr": t.optimizer.param_groups[0]["lr"],
        "train_loss": loss_sum / seen,
        "train_error": errors / seen,
        "images_per_second": seen / (time.perf_counter() - epoch_start),
    }


def _train_step(t: Trainer, idx: Tensor) -> tuple[Tensor, Tensor]:
    """One optimizer step on the images ``idx``; the batch's mean loss and its error count."""
    s = t.s
    xb = in_format(_gather(t.x_source, idx, t.device), t.memory_format)
    yb = _gather(t.y_source, idx, t.device)
    factor = _lr_factor(
        t.state["step"], steps_per_epoch=t.plan.steps_per_epoch, s=s, total=t.plan.steps
    )
    for group, base in zip(t.optimizer.param_groups, t.base_lrs, strict=True):
        group["lr"] = base * factor
    if t.augment is not None:
        xb = t.augment(xb)
    if s.augment.mixup:
        xb, yb_other, lam = mixup(xb, yb, s.augment.mixup)
    with autocast(t.device, s.amp):
        logits = t.net(xb)
        loss = F.cross_entropy(logits, yb, weight=t.weight, label_smoothing=s.label_smoothing)
        if s.augment.mixup:
            loss = lam * loss + (1 - lam) * F.cross_entropy(
                logits, yb_other, weight=t.weight, label_smoothing=s.label_smoothing
            )
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    if s.grad_clip is not None:
        t.scaler.unscale_(t.optimizer)
        nn.utils.clip_grad_norm_(t.model.parameters(), s.grad_clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    if t.ema is not None:
        t.ema.update(t.model)
    t.state["step"] += 1
    return loss, (logits.argmax(1) != yb).sum()


def _record(t: Trainer, row: dict) -> None:
    """Add the epoch's row to the history and log it (about 30 lines a run at most)."""
    row = {
        k: row[k]
        for k in (
            "epoch",
            "lr",
            "train_loss",
            "train_error",
            "val_loss",
            "val_error",
            "images_per_second",
        )
    }
    t.state["history"].append(row)
    t.tracker.log_epoch(t.name, row)
    epoch, every = row["epoch"], max(1, t.plan.epochs // 30)
    if t.rank == 0 and (epoch % every == 0 or epoch == t.plan.epochs):
        log.info(
            "%s epoch %d/%d  loss %.4f  acc %.3f  val_loss %.4f  val_acc %.3f  lr %.4g  %.0f img/s",
            t.name,
            epoch,
            t.plan.epochs,
            row["train_loss"],
            1 - row["train_error"],
            row["val_loss"],
            1 - row["val_error"],
            row["lr"],
            row["images_per_second"],
        )


def select(t: Trainer, row: dict, *, n_val: int) -> None:
    """Keep the epoch's weights when it scores best (by ``plan.monitor``); count patience."""
    epoch, val_loss, val_error = row["epoch"], row["val_loss"], row["val_error"]
    if not n_val or t.plan.monitor == "last":
        score = [epoch, 0.0]  # keep the last epoch; validation is for the record
    elif t.plan.monitor == "val_loss":
        score = [-val_loss, 1 - val_error]
    else:
        score = [1 - val_error, -val_loss]
    state = t.state
    if score > state["best"]:
        state.update(best=score, best_epoch=epoch, stale=0)
        state["best_state"] = copy.deepcopy(t.kept.state_dict())
        return
    state["stale"] += 1
    if t.s.patience is not None and state["stale"] >= t.s.patience:
        log.info("%s: early stop after %d epochs without improvement", t.name, state["stale"])
        state["finished"] = True


def _kept_phrase(monitor: str, configured: str, *, n_val: int) -> str:
    """Which weights are kept, and why, for the log."""
    if not n_val:
        return "the last epoch: no validation images"
    if monitor == "last" and configured == AUTO:
        return (
            f"the last epoch: train.monitor=auto, fewer than {MIN_VAL_PER_CLASS} validation "
            "windows per class"
        )
    if monitor == "last":
        return "the last epoch: train.monitor=last"
    return f"the best {monitor} epoch"


def _precise_bn(
    model: nn.Module,
    x_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    plan: Plan,
    device: torch.device,
    s: TrainSettings,
    memory_format,
    seed: int,
    name: str,
) -> dict | None:
    """Recompute the kept weights' batch-norm statistics over the training windows
    (:func:`pipeline.precise_bn.precise_batchnorm`) and log what it did to validation."""
    before = evaluate_loss(model, x_val, y_val, device=device, s=s, batch_size=2 * plan.batch_size)
    done = precise_batchnorm(
        model,
        x_train,
        batch_size=2 * plan.batch_size,
        device=device,
        autocast=lambda: autocast(device, s.amp),
        memory_format=memory_format,
        seed=seed,
    )
    if not done["layers"]:
        return None
    after = evaluate_loss(model, x_val, y_val, device=device, s=s, batch_size=2 * plan.batch_size)
    done.update(val_accuracy_before=1 - before[1], val_accuracy_after=1 - after[1])
    if rank_and_world()[0] == 0:
        log.info(
            "%s: batch-norm statistics of %d layers recomputed over %d training windows in "
            "%.1f s%s",
            name,
            done["layers"],
            done["windows"],
            done["seconds"],
            f" (validation accuracy {1 - before[1]:.3f} -> {1 - after[1]:.3f})"
            if len(x_val)
            else "",
        )
    return done


def _stage(x: Tensor, device: torch.device) -> Tensor:
    """Where training batches are gathered from.

    On CUDA the whole training set is copied to the device when it takes less
    than a third of the free memory: no host-to-device copy per batch and no
    loader stall. Otherwise each batch is gathered on the host into page-locked
    memory and copied asynchronously. An :class:`~pipeline.features.view.ImageView`
    (images read from disk a batch at a time) is copied to the device the same way, a
    chunk at a time, or read a batch at a time.
    """
    if device.type != "cuda":
        return x
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = x.element_size() * x.nelement()
    if nbytes < free / 3:
        log.info("training images on %s (%.0f MB)", device, nbytes / 2**20)
        return x.to(device)
    return x


def _gather(x: Tensor, idx: Tensor, device: torch.device) -> Tensor:
    """Rows ``idx`` of ``x`` on ``device``; ``idx`` lives where ``x`` does."""
    batch = x[idx]
    if x.device.type == device.type:  # staged on the device ("cuda" names "cuda:0" too)
        return batch
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def _rng_states(world: int) -> list[dict]:
    """This process's random number generator states, or under torch.distributed every
    rank's (in rank order): each rank draws its own augmentation and must resume its own."""
    mine = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state_all()
    if world == 1:
        return [mine]
    every: list = [None] * world
    torch.distributed.all_gather_object(every, mine)
    return every


# What every checkpoint this version writes holds besides the training state.
CHECKPOINT_KEYS = {"model", "optimizer", "scaler", "rng"}


def _save_checkpoint(
    path: Path, state: dict, model, optimizer, scaler, rng: list[dict], ema=None
) -> None:
    """Write the training state atomically: a crash mid-write leaves the previous one intact."""
    payload = {
        **state,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
    }
    if ema is not None:
        payload["ema"] = ema.state_dict()
    with atomic.atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(
    path: Path,
    model,
    optimizer,
    scaler,
    ema=None,
    *,
    rank: int = 0,
    world: int = 1,
    fingerprint: dict[str, str] | None = None,
) -> dict:
    """Restore the training state of ``path`` into the model, optimizer, scaler and average.

    Raises:
        ConfigError: ``path`` is unreadable, was written by an older version of this tool
            (another layout), or its fingerprint differs from ``fingerprint``.
    """
    payload = _read_checkpoint(path)
    if fingerprint is not None:
        check_fingerprint(path, payload.get("fingerprint"), fingerprint)
    try:
        model.load_state_dict(payload.pop("model"))
    except (KeyError, RuntimeError) as err:
        raise ConfigError(
            f"resume: {path} holds weights of another network ({str(err).splitlines()[0]}); "
            "resume with the settings it was trained with, or start a new run",
            keys=("resume",),
        ) from None
    averaged = payload.pop("ema", None)
    if ema is not None:
        # A checkpoint written without an average starts one from the resumed weights.
        if averaged is not None:
            ema.load_state_dict(averaged)
        else:
            ema.model.load_state_dict(model.state_dict())
    optimizer.load_state_dict(payload.pop("optimizer"))
    scaler.load_state_dict(payload.pop("scaler"))
    _restore_rng(path, payload.pop("rng"), rank=rank, world=world)
    return payload


def _read_checkpoint(path: Path) -> dict:
    """The contents of checkpoint ``path``, read with ``weights_only=True``.

    Raises:
        ConfigError: it cannot be read, or holds another layout than this version writes.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated: RuntimeError, EOFError; not a checkpoint: Unpickling
        raise ConfigError(
            f"resume: {path} cannot be read as a checkpoint (torch.load raised "
            f"{type(err).__name__}: it is truncated, damaged or another kind of file); delete "
            "it to train this model from the start",
            keys=("resume",),
        ) from None
    if not isinstance(payload, dict) or not payload.keys() >= CHECKPOINT_KEYS:
        raise ConfigError(
            f"resume: {path} is not a checkpoint of this version of the tool (an older version "
            "wrote it, or it is another file); delete it to train this model from the start",
            keys=("resume",),
        )
    return payload


def _restore_rng(path: Path, rng: list[dict], *, rank: int, world: int) -> None:
    """This rank's random states from :func:`_rng_states`; with another number of processes
    than saved them, each keeps its fresh seed (logged)."""
    if len(rng) != world:
        log.warning(
            "%s holds the random states of %d process(es), and %d resume it: each keeps its "
            "fresh seed, so augmentation draws differ from an uninterrupted run",
            path,
            len(rng),
            world,
        )
        return
    torch.set_rng_state(rng[rank]["torch"])
    if "cuda" in rng[rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng[rank]["cuda"])


def check_fingerprint(path: Path, saved: dict | None, current: dict[str, str]) -> None:
    """Refuse to resume ``path`` unless it was trained on what ``current`` describes.

    Raises:
        ConfigError: naming the first setting (in ``current``'s order) that differs.
    """
    if saved is None:
        raise ConfigError(
            f"resume: {path} carries no record of the data and settings it was trained with, "
            "so it cannot be checked; delete it, or start a new run without resume",
            keys=("resume",),
        )
    for key in [*current, *(k for k in saved if k not in current)]:
        then, now = saved.get(key, "(unset)"), current.get(key, "(unset)")
        if then != now:
            raise ConfigError(
                f"resume: {path} was trained with {key}={then}, and this run has {key}={now}; "
                "resume with the settings it was trained with, or start a new run without "
                "resume",
                keys=("resume",),
            )


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    device: torch.device,
    s: TrainSettings,
    batch_size: int = 256,
) -> tuple[float, float]:
    """Mean cross-entropy and error rate of ``model`` on (x, y); NaN for an empty set."""
    if len(x) == 0:
        return float("nan"), float("nan")
    logits = predict_logits(model, x, device=device, batch_size=batch_size, amp=s.amp)
    loss = F.cross_entropy(logits, y).item()
    error = (logits.argmax(1) != y).float().mean().item()
    return loss, error


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    x: Tensor | np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 256,
    amp: bool = True,
) -> Tensor:
    """Logits (N, n_classes) of images (N, C, H, W), computed in batches; returned on the CPU.

    ``x`` is a tensor, an array or an :class:`~pipeline.features.view.ImageView` (each batch
    read from it as it is needed)."""
    x = x if hasattr(x, "subset") else torch.as_tensor(x)
    model.eval()
    weight = next(p for p in model.parameters() if p.dim() >= 3)  # the first convolution's
    channels_last = weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    outs = []
    for i in range(0, len(x), batch_size):
        xb = in_format(x[i : i + batch_size].to(device), memory_format)
        with autocast(device, amp):
            outs.append(model(xb).float().cpu())
    return torch.cat(outs)
