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

import torch
from torch import nn

from pipeline import atomic
from pipeline.errors import BundleError
from pipeline.features.stft import Normalizer, STFTParams

FORMAT_VERSION = 2
# Version 2 adds features.per_group; bundles without it are still written as version 1,
# so releases that read only version 1 keep reading them and refuse the others.
READS = (1, 2)
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


def save_bundle(
    path: str | Path,
    model: Any,
    *,
    classes: list[str],
    data: dict,
    features: STFTParams,
    normalizer: Normalizer,
    extra: dict | None = None,
) -> Path:
    """Save ``model`` (a network with a ``config`` dict, or an SVMClassifier) as a bundle folder."""
    from pipeline.models.svm import save_svm

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION if normalizer.per_group else 1,
        "classes": list(classes),
        "data": data,
        "features": asdict(features),
        "normalizer": normalizer.to_dict(),
        "versions": package_versions(),
        **(extra or {}),
    }
    if isinstance(model, nn.Module):
        # Save the un-compiled module: torch.compile's wrapper prefixes keys with "_orig_mod.".
        module = getattr(model, "_orig_mod", model)
        meta["kind"] = "network"
        meta["model_config"] = dict(module.config)
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        with atomic.atomic_path(path / "weights.pt") as tmp:
            torch.save(state, tmp)
    else:
        meta["kind"] = "svm"
        meta["model_config"] = model.get_params()
        with atomic.atomic_path(path / "model.skops") as tmp:
            save_svm(model, tmp)
    atomic.write_json(path / "bundle.json", meta)
    return path


def load_bundle(path: str | Path) -> Bundle:
    """Load a bundle folder saved by :func:`save_bundle`.

    Raises:
        BundleError: the folder or its files are missing, or its format version
            is not this one.
    """
    from pipeline.models.resnet import build_resnet
    from pipeline.models.svm import load_svm

    path = Path(path)
    meta_path = path / "bundle.json"
    if not meta_path.is_file():
        raise BundleError(
            f"{path}: no bundle.json; point predict.model at a folder under <run>/models/ "
            "written by a completed run"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    version = meta.get("format_version")
    if version not in READS:
        raise BundleError(
            f"{path}: bundle format_version={version!r}, but this release reads versions "
            f"{list(READS)}; retrain the model, or install the release that wrote it "
            f"(it was written with {meta.get('versions', {}).get('stft-resnet-pipeline', '?')})"
        )
    kind = meta["kind"]
    if kind == "network":
        weights = path / "weights.pt"
        if not weights.is_file():
            raise BundleError(f"{path}: weights.pt is missing; the bundle is incomplete")
        model = build_resnet(**meta["model_config"])
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.eval()
    elif kind == "svm":
        model = load_svm(path / "model.skops")
    else:
        raise BundleError(f"{path}: kind={kind!r} is not 'network' or 'svm'")
    features = STFTParams.from_dict(meta["features"], sample_rate=meta["data"]["sample_rate"])
    return Bundle(
        kind=kind,
        model=model,
        classes=meta["classes"],
        data=meta["data"],
        features=features,
        normalizer=Normalizer.from_dict(meta["normalizer"]),
        meta=meta,
    )
