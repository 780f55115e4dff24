"""Self-describing model bundles: save and load without executing code from the file.

A bundle is a folder::

    <name>/bundle.json   format version, kind, classes, data and feature settings,
                         normalisation statistics, constructor arguments, versions
    <name>/weights.pt    a network's state_dict (loaded with weights_only=True), or
    <name>/model.skops   the SVM (skops: loads only the types it is told to trust)

``bundle.json`` is written last, so a folder without it is an interrupted save.
Predicting rebuilds everything from the bundle, never from the current config.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import atomic
from pipeline.calibration import bundle_temperature
from pipeline.errors import BundleError, ConfigError, config_keys
from pipeline.features.stft import Normalizer, STFTParams
from pipeline.frontend import Frontend
from pipeline.values import is_whole

# The one format this version writes and reads; an older bundle is refused (retrain it).
FORMAT_VERSION = 4  # 4: the model's input (image or raw) and window_norm
_PACKAGES = (
    "stft-resnet-pipeline",
    "torch",
    "torchaudio",
    "scikit-learn",
    "numpy",
    "scipy",
    "skops",
)


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages a bundle depends on."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class Bundle:
    """A loaded bundle.

    Attributes:
        kind: ``network`` or ``svm``.
        model: the rebuilt model, in eval mode for networks.
        classes: class names in score order.
        data: data settings: sample_rate, channels, segment_samples, hop_samples, pad.
        features: the image settings.
        normalizer: the training-split statistics.
        meta: the whole ``bundle.json``.
    """

    kind: str
    model: Any
    classes: list[str]
    data: dict
    features: STFTParams
    normalizer: Normalizer
    meta: dict

    @property
    def frontend(self) -> Frontend:
        """The front end the model was trained with, fitted."""
        return Frontend.from_bundle(self)


def save_bundle(
    path: str | Path,
    model: Any,
    *,
    classes: list[str],
    frontend: Frontend,
    data: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Save ``model`` (a :class:`pipeline.models.base.Model`, or the network or
    SVMClassifier it wraps) and its fitted ``frontend`` as a bundle folder.

    Args:
        data: more of the training data to keep beside the front end's settings (its
            group pattern and groups).
        extra: more top-level keys of ``bundle.json`` (name, seed, amp).
    """
    from pipeline.models.base import wrap

    if frontend.normalizer is None:
        raise ValueError("save_bundle needs a fitted front end (Frontend.fitted)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "classes": list(classes),
        "data": {**frontend.data_settings(), **(data or {})},
        "features": asdict(frontend.params),
        "normalizer": frontend.normalizer.to_dict(),
        "versions": package_versions(),
        **(extra or {}),
    }
    adapter = wrap(model)
    meta["input"] = adapter.input
    if adapter.input == "raw":
        if frontend.window_norm is None:
            raise ValueError(
                "save_bundle: a raw-input model needs frontend.window_norm; fit it first with "
                "Frontend.fitted_windows(training windows)"
            )
        meta["window_norm"] = frontend.window_norm.to_dict()
    meta.update(adapter.save(path))  # its files, and its kind and model_config
    atomic.write_json(path / "bundle.json", meta)
    return path


# The kinds of model a bundle holds.
KINDS = ("network", "svm", "minirocket")
# Keys every bundle.json holds; ``model_config`` too for a network.
_META_KEYS = ("kind", "classes", "data", "features", "normalizer")
_DATA_KEYS = ("sample_rate", "segment_samples", "hop_samples", "pad")
_NORMALIZER_KEYS = ("mode", "mean", "std", "per_image", "per_group")
# What a damaged or edited bundle can do about it.
_FIX = "restore the bundle's files from the run that saved it, or retrain the model"


def load_bundle(path: str | Path, *, key: str = "predict.model") -> Bundle:
    """Load a bundle folder saved by :func:`save_bundle`, checked whole.

    Every key is checked, and the parts against each other: the class names
    against the model's outputs, the window against the image, the image against
    the model's input and the normalisation statistics, so a damaged or edited
    bundle never predicts with wrong labels or ``nan`` confidences.

    Args:
        path: the bundle folder.
        key: the setting that named it, for the message when it is no bundle.

    Returns:
        The bundle, its network in eval mode.

    Raises:
        BundleError: a file is missing, unreadable or tampered with, a key is
            missing or holds a value outside its rule, the parts disagree, or
            the format is not :data:`FORMAT_VERSION` (an older bundle: retrain it);
            the message names the file and the key.
    """
    folder = Path(path)
    meta_file = folder / "bundle.json"
    meta = _read_meta(folder, key=key)
    _check_version(meta, file=meta_file)
    _require(meta, _META_KEYS, file=meta_file)
    kind = meta["kind"]
    if kind not in KINDS:
        raise BundleError(f"{meta_file}: kind={kind!r} is not one of {list(KINDS)}; {_FIX}")
    classes = _check_classes(meta["classes"], file=meta_file)
    data = _check_data(meta["data"], file=meta_file)
    features = _read_features(meta["features"], data=data, file=meta_file)
    height, width = _image_shape(features, data=data, file=meta_file)
    normalizer = _read_normalizer(meta["normalizer"], file=meta_file)
    if kind == "network":
        model, source = _load_network(folder, meta), folder / "weights.pt"
        channels, outputs = int(meta["model_config"]["in_channels"]), model.fc.out_features
    elif kind == "minirocket":
        model, source = _load_minirocket_file(folder / "model.skops"), folder / "model.skops"
        channels, outputs = model.n_channels_, len(model.classes_)
        _check_window_length(model.length_, data=data, source=source, file=meta_file)
    else:
        model, source = _load_svm_file(folder / "model.skops"), folder / "model.skops"
        channels, outputs = model.image_shape_[0], len(model.classes_)
        _check_svm_image(model, (height, width), source=source, file=meta_file)
    _check_class_count(classes, outputs=outputs, source=source, file=meta_file)
    _check_channels(data.get("channels", "mix"), channels_in=channels, file=meta_file)
    _check_normalizer_shape(normalizer, image=(channels, height, width), file=meta_file)
    _check_input(meta, channels=channels, file=meta_file)
    bundle_temperature(meta, file=meta_file)  # absent: 1.0; a bad one is refused here
    return Bundle(
        kind=kind,
        model=model,
        classes=classes,
        data=data,
        features=features,
        normalizer=normalizer,
        meta=meta,
    )


def _check_input(meta: dict, *, channels: int, file: Path) -> None:
    """``input`` is image or raw, a network's own, and a raw model has its windows'
    standardisation (``window_norm``) with finite statistics for its channels."""
    from pipeline.frontend import WINDOW_NORMS

    _require(meta, ("input",), file=file)
    kind = meta["input"]
    raw = meta["kind"] == "minirocket" or meta.get("model_config", {}).get("network") == "resnet1d"
    built = "raw" if raw else "image"
    if kind != built:
        raise BundleError(f"{file}: input={kind!r} is not the model's input ({built}); {_FIX}")
    if kind != "raw":
        return
    _require(meta, ("window_norm",), file=file)
    _require(meta["window_norm"], ("mode", "mean", "std"), file=file, prefix="window_norm")
    norm = meta["window_norm"]
    if norm["mode"] not in WINDOW_NORMS:
        raise BundleError(
            f"{file}: window_norm.mode={norm['mode']!r} is not one of {list(WINDOW_NORMS)}; {_FIX}"
        )
    for key in ("mean", "std"):
        value = np.asarray(norm[key], dtype=float) if isinstance(norm[key], list) else None
        good = value is not None and value.shape == (channels, 1) and np.isfinite(value).all()
        if not good or (key == "std" and not (value > 0).all()):
            raise BundleError(
                f"{file}: window_norm.{key} must be {channels} finite value(s) as [[v], ...]"
                f"{', all positive' if key == 'std' else ''}; {_FIX}"
            )


def _read_meta(folder: Path, *, key: str) -> dict:
    """``bundle.json`` of ``folder`` as a dict.

    Raises:
        BundleError: it is missing, unreadable, not JSON, or not a JSON object.
    """
    file = folder / "bundle.json"
    if not file.is_file():
        raise BundleError(
            f"{folder}: no bundle.json; point {key} at a folder under <run>/models/ "
            "written by a completed run"
        )
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{file}: is not readable JSON ({err}); {_FIX}") from None
    if not isinstance(meta, dict):
        raise BundleError(
            f"{file}: holds a JSON {type(meta).__name__}, but a bundle.json is an object "
            f"(kind, classes, data, features, normalizer, ...); {_FIX}"
        )
    return meta


def _check_version(meta: dict, *, file: Path) -> None:
    """``format_version`` is :data:`FORMAT_VERSION`: older bundles are retrained, not read."""
    version = meta.get("format_version")
    if version == FORMAT_VERSION:
        return
    if is_whole(version, minimum=1) and version < FORMAT_VERSION:
        raise BundleError(
            f"{file}: bundle format {version} is from an older version of this tool; retrain "
            "the model with this version"
        )
    versions = meta.get("versions")
    written = versions.get("stft-resnet-pipeline", "?") if isinstance(versions, dict) else "?"
    raise BundleError(
        f"{file}: bundle format_version={version!r}, but this release reads format "
        f"{FORMAT_VERSION}; retrain the model, or install the release that wrote it (it was "
        f"written with {written})"
    )


def _require(d: object, keys: tuple[str, ...], *, file: Path, prefix: str = "") -> None:
    """``d`` is a JSON object holding every one of ``keys`` (``prefix`` names it)."""
    where = prefix or "the top level"
    if not isinstance(d, dict):
        raise BundleError(f"{file}: {where}={d!r} must be a JSON object; {_FIX}")
    missing = [k for k in keys if k not in d]
    if missing:
        names = ", ".join(f"{prefix}.{k}" if prefix else k for k in missing)
        raise BundleError(f"{file}: key {names} is missing (from {where}); {_FIX}")


def _check_classes(classes: object, *, file: Path) -> list[str]:
    """``classes`` is a list of at least two distinct names."""
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise BundleError(
            f"{file}: classes={classes!r} must be a list of at least two distinct class "
            f"names, in score order; {_FIX}"
        )
    return classes


def _check_data(data: object, *, file: Path) -> dict:
    """The data settings: positive integer rate and window sizes, a boolean pad, the
    channel selection and the reading keys of :func:`pipeline.signals.read_signal`."""
    _require(data, _DATA_KEYS, file=file, prefix="data")
    for key in ("sample_rate", "segment_samples", "hop_samples"):
        if not is_whole(data[key], minimum=1):
            raise BundleError(
                f"{file}: data.{key}={data[key]!r} must be a positive integer; {_FIX}"
            )
    if not isinstance(data["pad"], bool):
        raise BundleError(f"{file}: data.pad={data['pad']!r} must be true or false; {_FIX}")
    channels = data.get("channels", "mix")
    if channels not in ("mix", "all") and not (
        isinstance(channels, list)
        and channels
        and all(isinstance(c, int) and not isinstance(c, bool) for c in channels)
    ):
        raise BundleError(
            f"{file}: data.channels={channels!r} must be 'mix', 'all' or a list of channel "
            f"indices; {_FIX}"
        )
    axis = data.get("channel_axis", "auto")  # the reading keys are optional: read_signal's defaults
    if axis not in ("auto", "first", "last"):
        raise BundleError(f"{file}: data.channel_axis={axis!r} must be auto, first or last; {_FIX}")
    for key in ("mat_key", "npz_key", "group_regex"):
        if not isinstance(data.get(key), str | None):
            raise BundleError(f"{file}: data.{key}={data[key]!r} must be a string or null; {_FIX}")
    columns = data.get("csv_columns")
    if columns is not None and not (
        isinstance(columns, list) and all(isinstance(c, int | str) for c in columns)
    ):
        raise BundleError(
            f"{file}: data.csv_columns={columns!r} must be null or a list of column indices "
            f"or names; {_FIX}"
        )
    return data


def _read_features(features: object, *, data: dict, file: Path) -> STFTParams:
    """The image settings, checked by :class:`STFTParams` (its messages name ``features.<key>``)."""
    if not isinstance(features, dict):
        raise BundleError(f"{file}: features={features!r} must be a JSON object; {_FIX}")
    try:
        with config_keys("features.", names={"sample_rate": "data.sample_rate"}):
            params = STFTParams.from_dict(features)
    except (ConfigError, TypeError, ValueError) as err:
        raise BundleError(f"{file}: features do not describe an image: {err}; {_FIX}") from None
    if params.sample_rate is not None and params.sample_rate != data["sample_rate"]:
        raise BundleError(
            f"{file}: features.sample_rate={params.sample_rate!r} differs from "
            f"data.sample_rate={data['sample_rate']!r}; they are one rate; {_FIX}"
        )
    return params


def _image_shape(features: STFTParams, *, data: dict, file: Path) -> tuple[int, int]:
    """(height, width) of the image of one window; the window gives at least one frame."""
    samples = data["segment_samples"]
    if features.n_frames(samples) < 1:
        raise BundleError(
            f"{file}: data.segment_samples={samples} is shorter than features.n_fft="
            f"{features.n_fft} with center=false, so a window gives no STFT frame; {_FIX}"
        )
    height, width = features.image_shape(samples)
    return int(height), int(width)


def _read_normalizer(d: object, *, file: Path) -> Normalizer:
    """The normalisation statistics: finite means, positive finite standard deviations."""
    _require(d, _NORMALIZER_KEYS, file=file, prefix="normalizer")
    if d["mode"] not in ("global", "per_freq"):
        raise BundleError(
            f"{file}: normalizer.mode={d['mode']!r} must be 'global' or 'per_freq'; {_FIX}"
        )
    if d["per_image"] not in (True, False, "freq"):
        raise BundleError(
            f"{file}: normalizer.per_image={d['per_image']!r} must be false, true or 'freq'; {_FIX}"
        )
    if d["per_group"] not in (False, None, "freq"):
        raise BundleError(
            f"{file}: normalizer.per_group={d['per_group']!r} must be false or 'freq'; {_FIX}"
        )
    for key in ("mean", "std"):
        _check_statistic(d[key], key=key, file=file)
    return Normalizer.from_dict(d)


def _check_statistic(value: object, *, key: str, file: Path) -> None:
    """``normalizer.<key>`` is a finite numeric array (positive for ``std``), as float32."""
    try:
        # float32, as Normalizer.from_dict holds it: 1e-50 becomes 0 and 1e300 inf there.
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise BundleError(
            f"{file}: normalizer.{key} is not a numeric array (a number or nested lists of "
            f"equal lengths); {_FIX}"
        ) from None
    if array.ndim > 3 or not np.isfinite(array).all():
        raise BundleError(
            f"{file}: normalizer.{key} (shape {array.shape}) must hold finite numbers and "
            f"broadcast to (channels, height, width); {_FIX}"
        )
    if key == "std" and not (array > 0).all():
        raise BundleError(
            f"{file}: normalizer.std holds {int((array <= 0).sum())} value(s) <= 0 (smallest "
            f"{array.min():g} as float32); every standard deviation must be positive, since "
            f"images are divided by it; {_FIX}"
        )


def _load_network(folder: Path, meta: dict) -> nn.Module:
    """The network of ``model_config`` with the tensors of ``weights.pt``, in eval mode."""
    from pipeline.models.resnet import build_resnet
    from pipeline.models.resnet1d import build_resnet1d

    file, weights = folder / "bundle.json", folder / "weights.pt"
    _require(meta, ("model_config",), file=file)
    config = meta["model_config"]
    if not isinstance(config, dict):
        raise BundleError(f"{file}: model_config={config!r} must be a JSON object; {_FIX}")
    if not is_whole(config.get("in_channels"), minimum=1):
        raise BundleError(
            f"{file}: model_config.in_channels={config.get('in_channels')!r} must be a positive "
            f"integer; {_FIX}"
        )
    if not weights.is_file():
        raise BundleError(f"{folder}: weights.pt is missing; the bundle is incomplete")
    state = _read_state(weights)
    builder = build_resnet1d if config.get("network") == "resnet1d" else build_resnet
    try:
        model = builder(**config)
    except (ConfigError, TypeError) as err:
        raise BundleError(f"{file}: model_config does not build a network: {err}; {_FIX}") from None
    _check_state_fits(model, state, weights=weights, file=file)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # names and shapes fit; a tensor that cannot be copied in
        reason = str(err).splitlines()[-1].strip()
        raise BundleError(f"{weights}: does not load into the network: {reason}; {_FIX}") from None
    return model.eval()


def _read_state(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``weights.pt``, read with ``weights_only=True``: never any code.

    Raises:
        BundleError: the file is not a state_dict of finite tensors, e.g. a truncated
            file or a pickle that would run code (torch's own message is not repeated:
            it suggests turning that protection off).
    """
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to read is a damaged file; the type says which
        raise BundleError(
            f"{weights}: is not a state_dict of tensors ({type(err).__name__}): the file is "
            "damaged or holds other objects, such as code in a pickle, which is never run; "
            f"{_FIX}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise BundleError(
            f"{weights}: holds a {type(state).__name__}, not a state_dict (names to tensors); "
            f"{_FIX}"
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise BundleError(
            f"{weights}: {len(bad)} tensor(s) hold NaN or infinite values (first {bad[0]!r}), "
            f"which would give nan confidences; {_FIX}"
        )
    return state


def _check_state_fits(model: nn.Module, state: dict, *, weights: Path, file: Path) -> None:
    """``state`` has exactly the names and shapes of ``model``'s state_dict."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    if not (missing or unexpected or wrong):
        return
    parts = [
        f"{len(names)} {what} (first {names[0]!r})"
        for names, what in ((missing, "missing"), (unexpected, "unexpected"))
        if names
    ]
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} of another shape (first {k!r}: {tuple(state[k].shape)}, where "
            f"model_config builds {tuple(expected[k].shape)})"
        )
    raise BundleError(
        f"{weights}: does not fit model_config of {file} ({', '.join(parts)}): the weights "
        f"and bundle.json come from different models; {_FIX}"
    )


def _load_svm_file(file: Path) -> Any:
    """The fitted SVM of ``model.skops``, loaded trusting only the types save_svm writes."""
    from pipeline.models.svm import load_svm

    if not file.is_file():
        raise BundleError(f"{file.parent}: model.skops is missing; the bundle is incomplete")
    try:
        model = load_svm(file)
    except Exception as err:  # skops raises many types for a damaged file; all mean damaged
        reason = " ".join(str(err).split())  # one line
        raise BundleError(
            f"{file}: is not an SVM saved by save_svm ({type(err).__name__}: {reason}); {_FIX}"
        ) from None
    if getattr(model, "classes_", None) is None or getattr(model, "image_shape_", None) is None:
        raise BundleError(f"{file}: holds an SVM that was never fitted; {_FIX}")
    return model


def _load_minirocket_file(file: Path) -> Any:
    """The fitted MiniRocket of ``model.skops``, loaded trusting only the types it writes."""
    from pipeline.models.minirocket import EXTRA, load_minirocket

    if not file.is_file():
        raise BundleError(f"{file.parent}: model.skops is missing; the bundle is incomplete")
    try:
        return load_minirocket(file)
    except ValueError as err:
        if str(err) == EXTRA:
            raise BundleError(f"{file}: {EXTRA}") from None
        raise BundleError(f"{file}: {err}; {_FIX}") from None
    except Exception as err:  # skops raises many types for a damaged file; all mean damaged
        reason = " ".join(str(err).split())
        raise BundleError(f"{file}: is not a saved MiniRocket ({reason}); {_FIX}") from None


def _check_window_length(length: int, *, data: dict, source: Path, file: Path) -> None:
    """A raw-window model was fitted on windows of the bundle's length."""
    if length != data["segment_samples"]:
        raise BundleError(
            f"{source}: was fitted on {length}-sample windows, and {file} says "
            f"data.segment_samples={data['segment_samples']}; {_FIX}"
        )


def _check_svm_image(model: Any, image: tuple[int, int], *, source: Path, file: Path) -> None:
    """The SVM was fitted on images of the (height, width) the bundle's features give."""
    fitted = tuple(model.image_shape_[1:])
    if fitted != image:
        raise BundleError(
            f"{file}: features and data.segment_samples give images of (height, width)="
            f"{image}, but the SVM in {source.name} was fitted on {fitted}; {_FIX}"
        )


def _check_class_count(classes: list[str], *, outputs: int, source: Path, file: Path) -> None:
    """One class name per model output, or the labels would be wrong."""
    if len(classes) != outputs:
        raise BundleError(
            f"{file}: classes holds {len(classes)} names ({classes}), but the model in "
            f"{source.name} scores {outputs} classes; its labels would be wrong; {_FIX}"
        )


def _check_channels(channels: str | list[int], *, channels_in: int, file: Path) -> None:
    """``data.channels`` gives the model's input channels: one for ``mix``, one per index."""
    expected = 1 if channels == "mix" else None if channels == "all" else len(channels)
    if expected is not None and expected != channels_in:
        raise BundleError(
            f"{file}: data.channels={channels!r} gives {expected} channel(s), but the model "
            f"takes {channels_in} (model_config.in_channels, or the SVM's images); {_FIX}"
        )


def _check_normalizer_shape(
    normalizer: Normalizer, *, image: tuple[int, int, int], file: Path
) -> None:
    """``normalizer.mean`` and ``.std`` broadcast to the (channels, height, width) image."""
    for key in ("mean", "std"):
        shape = getattr(normalizer, key).shape
        try:
            fits = np.broadcast_shapes(shape, image) == image
        except ValueError:
            fits = False
        if not fits:
            raise BundleError(
                f"{file}: normalizer.{key} has shape {shape}, which does not broadcast to the "
                f"(channels, height, width)={image} images of features and "
                f"data.segment_samples; {_FIX}"
            )
