"""The model interface the main job trains, evaluates and saves, with its two adapters.

A model is built from its config node (:func:`build`), fitted on training images (with
validation images where it uses them), scores test images, counts its parameters and
writes its own files into a bundle folder. Which kind a model is, is decided here only:
the job calls the interface, never ``isinstance``. A new baseline is one adapter and one
config file.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf
from scipy.special import softmax
from torch import Tensor, nn

from pipeline import atomic
from pipeline.errors import ConfigError
from pipeline.features.view import ImageView, as_numpy, chunked
from pipeline.fit import TrainSettings, fit, predict_logits
from pipeline.models.minirocket import MiniRocketClassifier
from pipeline.runtime import autocast, in_format
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What fitting and scoring may use beyond the images.

    Attributes:
        settings: the training recipe (networks).
        device: where networks train and score.
        seed: seeds the batch order and the SVM's folds.
        progress: show progress bars.
        name: the model's name in the log.
        checkpoint: where a network writes its training state after every epoch.
        resume: continue from ``checkpoint`` when it exists.
        fingerprint: what the model is trained on, stored in and checked against the checkpoint.
        tracker: receives a network's every epoch (:mod:`pipeline.tracking`); None: nothing.
    """

    settings: TrainSettings
    device: torch.device
    seed: int = 0
    progress: bool = False
    name: str = "model"
    checkpoint: Path | None = None
    resume: bool = False
    fingerprint: dict[str, str] | None = None
    tracker: Tracker | None = None


class Model(Protocol):
    """A classifier of images (n, channels, height, width) into ``n_classes`` classes.

    Attributes:
        kind: ``network``, ``svm`` or ``minirocket``: the bundle's kind.
        adapts: whether its batch-norm statistics can be re-estimated per test group.
        exports: whether ``task=export`` writes it as ONNX.
        input: ``image`` or ``raw``: which of the front end's outputs it takes.
        fitted: the wrapped, fitted object (an ``nn.Module``, an ``SVMClassifier``).
        softmax_scores: whether its probabilities are the softmax of its scores; then
            ``temperature`` divides the scores first (:mod:`pipeline.calibration`).
    """

    kind: ClassVar[str]
    adapts: ClassVar[bool]
    exports: ClassVar[bool]
    fitted: Any

    def fit(self, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, *, ctx: Context) -> dict:
        """Fit on the training images; returns what metrics.json records of the fit."""

    def scores(self, x: Tensor, *, ctx: Context) -> np.ndarray:
        """Class scores (n, n_classes), higher for the likelier class (logits, decisions)."""

    def check(self) -> None:
        """Refuse a setting the model cannot use, before any file is read."""

    def n_params(self) -> int:
        """The numbers the fitted model stores to predict."""

    def save(self, folder: Path) -> dict:
        """Write the model's files into ``folder``; returns its bundle.json fields."""

    @property
    def in_channels(self) -> int:
        """The image channels the fitted model takes."""

    def to(self, device: torch.device) -> Model:
        """The model ready to classify on ``device`` (itself)."""

    def probabilities(self, images: Tensor, *, device: torch.device, amp: bool) -> np.ndarray:
        """Class scores that sum to 1 (n, n_classes), float64, of images on ``device``."""


@dataclass
class Network:
    """A network returning logits (ResNet, plain twin), trained by :func:`pipeline.fit.fit`."""

    kind: ClassVar[str] = "network"
    adapts: ClassVar[bool] = True
    exports: ClassVar[bool] = True  # to ONNX (task=export)
    fitted: nn.Module = None
    train_seconds: float = 0.0
    batch_size: int = 128  # the training batch, reused to adapt batch norms per group
    history: list = field(default_factory=list)
    temperature: float = 1.0  # probabilities: softmax(logits / T) (pipeline.calibration)
    softmax_scores: ClassVar[bool] = True  # its probabilities are a softmax of its scores

    def fit(self, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, *, ctx: Context) -> dict:
        log.info("%s: %s, %d parameters", ctx.name, type(self.fitted).__name__, self.n_params())
        result = fit(
            self.fitted,
            x,
            y,
            x_val,
            y_val,
            settings=ctx.settings,
            device=ctx.device,
            seed=ctx.seed,
            progress=ctx.progress,
            name=ctx.name,
            checkpoint=ctx.checkpoint,
            resume=ctx.resume,
            fingerprint=ctx.fingerprint,
            tracker=ctx.tracker,
        )
        self.train_seconds, self.batch_size = result.train_seconds, result.plan.batch_size
        self.history = result.history
        return {
            "best_epoch": result.best_epoch,
            "training": result.plan.to_dict(),
            "precise_bn": result.precise_bn,
        }

    def check(self) -> None:
        """Its builder checked the settings already."""

    def scores(self, x: Tensor, *, ctx: Context) -> np.ndarray:
        return predict_logits(self.fitted, x, device=ctx.device, amp=ctx.settings.amp).numpy()

    def n_params(self) -> int:
        return sum(p.numel() for p in self.fitted.parameters())

    def save(self, folder: Path) -> dict:
        # The un-compiled module: torch.compile's wrapper prefixes keys with "_orig_mod.".
        module = getattr(self.fitted, "_orig_mod", self.fitted)
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        with atomic.atomic_path(folder / "weights.pt") as tmp:
            torch.save(state, tmp)
        return {"kind": self.kind, "model_config": dict(module.config)}

    @property
    def in_channels(self) -> int:
        return int(self.fitted.config["in_channels"])

    @property
    def input(self) -> str:
        """``image`` (STFT images) or ``raw`` (the standardised windows: the 1-D ResNet)."""
        return getattr(self.fitted, "input_kind", "image")

    def to(self, device: torch.device) -> Network:
        # channels_last: about 2x faster convolutions on CPUs too (see pipeline.fit)
        self.fitted = self.fitted.to(device, memory_format=torch.channels_last).eval()
        return self

    @torch.no_grad()
    def probabilities(self, images: Tensor, *, device: torch.device, amp: bool) -> np.ndarray:
        x = in_format(images, torch.channels_last)
        with autocast(device, amp):
            logits = self.fitted(x).float()
        return torch.softmax(logits / self.temperature, dim=1).cpu().numpy().astype(np.float64)


@dataclass
class Estimator:
    """A fitted scikit-learn estimator, computed on the CPU: what the SVM and MiniRocket
    adapters share (a skops file ``model.skops``, decision scores, ``predict_proba``)."""

    kind: ClassVar[str]
    input: ClassVar[str]
    adapts: ClassVar[bool] = False
    exports: ClassVar[bool] = False  # to ONNX (task=export)
    fitted: Any = None
    train_seconds: float = 0.0
    history: list = field(default_factory=list)
    temperature: float = 1.0  # where probabilities are softmax(scores / T)

    @property
    def softmax_scores(self) -> bool:
        """Whether its probabilities are the softmax of its decision scores (MiniRocket; the
        SVM with ``scores=decision``), so a temperature scales them."""
        return getattr(self.fitted, "scores", "decision") == "decision"

    def check(self) -> None:
        """Refuse a bad setting (or a missing optional package) before any file is read."""
        self.fitted._check_params()

    def scores(self, x: Tensor, *, ctx: Context) -> np.ndarray:
        return chunked(self.fitted.decision_function, x)

    def n_params(self) -> int:
        return int(self.fitted.n_params_)

    def save(self, folder: Path) -> dict:
        with atomic.atomic_path(folder / "model.skops") as tmp:
            self.write(self.fitted, tmp)
        return {"kind": self.kind, "model_config": self.fitted.get_params()}

    @staticmethod
    def write(model: Any, path: Path) -> None:
        """Save ``model`` to ``path`` with skops (each adapter's own function)."""
        raise NotImplementedError

    def to(self, device: torch.device) -> Estimator:
        return self  # scikit-learn computes on the CPU

    def probabilities(self, images: Tensor, *, device: torch.device, amp: bool) -> np.ndarray:
        if self.temperature == 1.0 or not self.softmax_scores:
            return chunked(self.fitted.predict_proba, images)
        scores = chunked(self.fitted.decision_function, images)
        return softmax(scores / self.temperature, axis=1)


@dataclass
class SVM(Estimator):
    """The RBF SVM baseline (:class:`pipeline.models.svm.SVMClassifier`) on flattened images."""

    kind: ClassVar[str] = "svm"
    input: ClassVar[str] = "image"

    def fit(self, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, *, ctx: Context) -> dict:
        log.info(
            "%s: fitting %s with a grid search on the training split",
            ctx.name,
            type(self.fitted).__name__,
        )
        t0 = time.perf_counter()
        x, y, given = self._subsampled(x, y)
        try:
            self.fitted.fit(as_numpy(x), y.numpy())
        except ValueError as err:  # a setting the data cannot satisfy (pca beyond a fold's size)
            # A failed grid search quotes every fit's traceback: keep its last error alone.
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            errors = [line.split(": ", 1)[1] for line in lines if re.match(r"\w+Error: ", line)]
            reason = errors[-1] if errors else (lines[0] if lines else type(err).__name__)
            raise ConfigError(
                f"{ctx.name}: fitting on {len(x)} training images failed: {reason}; adjust the "
                f"{ctx.name}.* setting it names"
            ) from None
        self.train_seconds = time.perf_counter() - t0
        best = {
            k: v.item() if isinstance(v, np.generic) else v
            for k, v in self.fitted.best_params_.items()
        }
        log.info("%s: best %s, fitted in %.1f s", ctx.name, best, self.train_seconds)
        used = self.fitted.fit_windows_
        self.fitted.train_windows_ = given
        if used == given:
            return {"best_params": best}
        log.warning(
            "%s: fitted on a stratified subsample of %d of the %d training windows "
            "(%s.max_windows; the exact RBF SVM's cost grows with about their square)",
            ctx.name,
            used,
            given,
            ctx.name,
        )
        return {"best_params": best, "fit_windows": used, "train_windows": given}

    def _subsampled(self, x, y: Tensor) -> tuple[Any, Tensor, int]:
        """``(x, y, len(y))``; for images read from disk (an ImageView) beyond ``max_windows``,
        only the rows of the stratified subsample the fit would draw anyway, so the others
        are never read into memory."""
        from pipeline.models.svm import stratified_subsample

        m, given = self.fitted.max_windows, len(y)
        if isinstance(x, ImageView) and m is not None and given > m:
            keep = stratified_subsample(y.numpy(), m, seed=self.fitted.random_state)
            return x.subset(keep), y[torch.from_numpy(keep)], given
        return x, y, given

    @staticmethod
    def write(model: Any, path: Path) -> None:
        from pipeline.models.svm import save_svm

        save_svm(model, path)

    @property
    def in_channels(self) -> int:
        return int(self.fitted.image_shape_[0])


@dataclass
class MiniRocket(Estimator):
    """MiniRocket (:class:`pipeline.models.minirocket.MiniRocketClassifier`) on raw windows."""

    kind: ClassVar[str] = "minirocket"
    input: ClassVar[str] = "raw"

    def fit(self, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, *, ctx: Context) -> dict:
        log.info(
            "%s: MiniRocket features of %d training windows, ridge classifier", ctx.name, len(x)
        )
        t0 = time.perf_counter()
        try:
            self.fitted.fit(x.numpy(), y.numpy())
        except ValueError as err:  # a window the kernels do not fit
            raise ConfigError(f"{ctx.name}: {err}") from None
        self.train_seconds = time.perf_counter() - t0
        alpha = float(self.fitted.ridge_.alpha_)
        log.info("%s: ridge alpha %.3g, fitted in %.1f s", ctx.name, alpha, self.train_seconds)
        return {"best_params": {"alpha": alpha}}

    @staticmethod
    def write(model: Any, path: Path) -> None:
        from pipeline.models.minirocket import save_minirocket

        save_minirocket(model, path)

    @property
    def in_channels(self) -> int:
        return int(self.fitted.n_channels_)


def wrap(obj: Any) -> Model:
    """The adapter of a built model (a module is a :class:`Network`, a
    ``MiniRocketClassifier`` a :class:`MiniRocket`, anything else an :class:`SVM`); an adapter
    is returned as it is."""
    if isinstance(obj, Network | Estimator):
        return obj
    if isinstance(obj, nn.Module):
        return Network(obj)
    return MiniRocket(obj) if isinstance(obj, MiniRocketClassifier) else SVM(obj)


def build(node, *, name: str, n_classes: int, in_channels: int, seed: int) -> Model:
    """Instantiate the config ``node`` of model ``name`` and wrap it.

    A builder that takes ``num_classes`` and ``in_channels`` (the networks) gets them; the
    same ``seed`` before each build gives a ResNet and its plain twin the same initial draw.
    The node's ``train`` key, where it has one, is the model's own training recipe, not a
    builder argument.

    Raises:
        ConfigError: the builder refused a setting (its ValueError, prefixed with ``name``).
    """
    torch.manual_seed(seed)
    sizes = {"num_classes": n_classes, "in_channels": in_channels}
    try:
        accepted = inspect.signature(get_method(node._target_)).parameters
        kwargs = {k: v for k, v in sizes.items() if k in accepted}
        spec = (
            OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        )
        spec.pop("train", None)  # the model's own training settings (compare.train_settings)
        model = wrap(instantiate(spec, **kwargs, _convert_="all"))
        model.check()
        return model
    except Exception as err:  # Hydra wraps the builder's ValueError in InstantiationException
        cause = err.__cause__ or err
        if isinstance(cause, ValueError):
            raise ConfigError(f"{name}: {cause}") from err
        raise
