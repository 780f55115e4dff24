"""The main job: train ResNet, its plain twin and the SVM on one split and compare them.

signal files -> records -> split by recording -> windows -> STFT images ->
normalise (training statistics) -> fit each model -> evaluate on the test split ->
bundles, predictions, metrics.json, figures, report.md.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline import atomic, report
from pipeline.bundle import package_versions, save_bundle
from pipeline.data.dataset import Windows, load_windows
from pipeline.data.records import find_records
from pipeline.data.split import SPLITS, stratified_split
from pipeline.data.synthetic import ensure_dataset
from pipeline.errors import ConfigError
from pipeline.features.stft import Normalizer, STFTParams, compute_images
from pipeline.fit import TrainSettings, fit, predict_logits, resolve_device
from pipeline.metrics import classification_metrics, file_level_accuracy

log = logging.getLogger(__name__)


def stft_params(cfg: DictConfig) -> STFTParams:
    """The ``features`` config group as :class:`STFTParams` (validated)."""
    f = cfg.features
    size = OmegaConf.to_object(f.size) if f.size is not None else None
    return STFTParams(
        n_fft=f.n_fft,
        hop_length=f.hop_length,
        win_length=f.win_length,
        window=f.window,
        center=f.center,
        pad_mode=f.pad_mode,
        power=f.power,
        scale=f.scale,
        top_db=f.top_db,
        size=tuple(size) if size is not None else None,
    )


def train_settings(cfg: DictConfig) -> TrainSettings:
    """The ``train`` config group as :class:`TrainSettings` (validated)."""
    t = OmegaConf.to_container(cfg.train, resolve=True)
    known = TrainSettings.__dataclass_fields__
    unknown = sorted(set(t) - set(known))
    if unknown:
        raise ConfigError(f"train.{unknown[0]} is not a training setting; known: {sorted(known)}")
    if "milestones" in t:
        t["milestones"] = tuple(t["milestones"])
    return TrainSettings(**t)


def model_names(cfg: DictConfig) -> list[str]:
    """The ``models`` list, each name checked against the configured models."""
    configured = [k for k, v in cfg.items() if isinstance(v, DictConfig) and "_target_" in v]
    names = list(cfg.models)
    if not names:
        raise ConfigError(f"models=[] is empty; choose from {configured}")
    for name in names:
        if name not in configured:
            raise ConfigError(
                f"models={names}: {name!r} is not a configured model; choose from {configured}"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"models={names} names a model twice")
    return names


def prepare_data(cfg: DictConfig, *, progress: bool) -> tuple[list, list[str], dict, Windows]:
    """Find, split and read the dataset.

    Returns:
        records, classes, {split: record indices}, windows of all usable records.
    """
    d = cfg.data
    if d.get("generate"):
        ensure_dataset(d.root, **OmegaConf.to_container(d.generate, resolve=True))
    records = find_records(d.root)
    classes = sorted({r.label for r in records})
    split = stratified_split(
        [r.label for r in records],
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=d.split_seed,
    )
    channels = d.channels if isinstance(d.channels, str) else list(d.channels)
    windows = load_windows(
        records,
        sample_rate=d.sample_rate,
        channels=channels,
        length_seconds=d.segment.length_seconds,
        hop_seconds=d.segment.hop_seconds,
        pad=d.segment.pad,
        progress=progress,
    )
    return records, classes, split, windows


def run(cfg: DictConfig, *, run_dir: Path) -> dict:
    """Run the comparison and write its outputs into ``run_dir``.

    Returns:
        The contents of ``metrics.json``.
    """
    progress = cfg.progress
    names = model_names(cfg)
    params = stft_params(cfg)
    settings = train_settings(cfg)
    device = resolve_device(cfg.device)
    for name in names:  # a bad model setting fails now, not after the data is read
        _build(cfg, name, n_classes=2, in_channels=1, seed=cfg.seed)
    log.info("device %s, models %s, run folder %s", device, names, run_dir)

    records, classes, split, windows = prepare_data(cfg, progress=progress)
    record_split = np.empty(len(records), dtype=object)
    for name, idx in split.items():
        record_split[idx] = name
    window_split = record_split[windows.record]
    label_index = {c: i for i, c in enumerate(classes)}
    y = np.array([label_index[records[i].label] for i in windows.record], dtype=np.int64)
    masks = {name: window_split == name for name in SPLITS}
    if not masks["train"].any() or not masks["test"].any():
        raise ConfigError("the split left no training or no test windows; check data.*_fraction")
    n_records = {name: len(set(windows.record[masks[name]].tolist())) for name in SPLITS}
    log.info(
        "%d classes, %d files -> windows: train %d, val %d, test %d",
        len(classes), len(records), *(int(masks[s].sum()) for s in SPLITS),
    )  # fmt: skip

    t0 = time.perf_counter()
    raw_images = compute_images(
        windows.x, params, device=device, batch_size=cfg.features.batch_size, progress=progress
    )
    feature_seconds = time.perf_counter() - t0
    normalizer = Normalizer.fit(raw_images[masks["train"]], mode=cfg.features.normalize)
    images = normalizer(raw_images)
    log.info("images %s computed in %.1f s", images.shape[1:], feature_seconds)

    data_settings = {
        "sample_rate": cfg.data.sample_rate,
        "channels": OmegaConf.to_object(cfg.data.channels)
        if not isinstance(cfg.data.channels, str)
        else cfg.data.channels,
        "segment_samples": windows.length,
        "hop_samples": windows.hop,
        "pad": cfg.data.segment.pad,
    }
    tensors = {
        s: (torch.from_numpy(images[masks[s]]), torch.from_numpy(y[masks[s]])) for s in SPLITS
    }
    test_paths = [str(records[i].path) for i in windows.record[masks["test"]]]
    test_starts = windows.start[masks["test"]] / cfg.data.sample_rate
    segmented = len(windows.record) > len(set(windows.record.tolist()))

    results: dict[str, dict] = {}
    histories: dict[str, list[dict]] = {}
    for name in names:
        model = _build(
            cfg, name, n_classes=len(classes), in_channels=images.shape[1], seed=cfg.seed
        )
        x_tr, y_tr = tensors["train"]
        x_te, y_te = tensors["test"]
        if isinstance(model, nn.Module):
            log.info("%s: %s, %d parameters", name, cfg[name]._target_, _n_params(model))
            result = fit(
                model, x_tr, y_tr, *tensors["val"],
                settings=settings, device=device, seed=cfg.seed, progress=progress, name=name,
            )  # fmt: skip
            histories[name] = result.history
            train_seconds = result.train_seconds
            t0 = time.perf_counter()
            scores = predict_logits(model, x_te, device=device, amp=settings.amp).numpy()
            infer_seconds = time.perf_counter() - t0
            extra = {"best_epoch": result.best_epoch}
        else:
            log.info(
                "%s: fitting %s with a grid search on the training split",
                name,
                type(model).__name__,
            )
            t0 = time.perf_counter()
            model.fit(x_tr.numpy(), y_tr.numpy())
            train_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            scores = model.decision_function(x_te.numpy())
            infer_seconds = time.perf_counter() - t0
            extra = {"best_params": {k: _jsonable(v) for k, v in model.best_params_.items()}}
            log.info("%s: best %s, fitted in %.1f s", name, extra["best_params"], train_seconds)
        y_pred = scores.argmax(1)
        m = classification_metrics(y_te.numpy(), y_pred, classes)
        if segmented:
            m["file_accuracy"] = file_level_accuracy(
                scores, y_te.numpy(), windows.record[masks["test"]]
            )
        m.update(
            n_params=_n_params(model),
            train_seconds=train_seconds,
            inference_images_per_second=len(x_te) / max(infer_seconds, 1e-9),
            **extra,
        )
        results[name] = m
        log.info("%s: test accuracy %.4f, macro-F1 %.4f", name, m["accuracy"], m["macro_f1"])
        save_bundle(
            run_dir / "models" / name, model,
            classes=classes, data=data_settings, features=params, normalizer=normalizer,
            extra={"name": name, "seed": cfg.seed},
        )  # fmt: skip
        _write_predictions(
            run_dir / "predictions" / f"{name}.csv",
            test_paths,
            test_starts,
            y_te.numpy(),
            scores,
            classes,
        )

    metrics = {
        "models": results,
        "dataset": {
            "name": cfg.data.name,
            "root": str(cfg.data.root),
            "classes": classes,
            "n_train": int(masks["train"].sum()),
            "n_val": int(masks["val"].sum()),
            "n_test": int(masks["test"].sum()),
            "files": {s: n_records[s] for s in SPLITS},
            "files_per_class": {
                c: {s: int(sum(1 for i in split[s] if records[i].label == c)) for s in SPLITS}
                for c in classes
            },
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in windows.skipped],
            "resampled": len(windows.resampled),
            "sample_rate": cfg.data.sample_rate,
            "segment_samples": windows.length,
        },
        "features": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in params.__dict__.items()},
            "normalize": cfg.features.normalize,
            "image_shape": list(images.shape[1:]),
            "seconds": feature_seconds,
        },
        "histories": histories,
        "run": {
            "seed": cfg.seed,
            "device": str(device),
            "command": "python -m pipeline.run " + " ".join(_quote(a) for a in sys.argv[1:]),
            "versions": package_versions(),
            "git_commit": report.git_commit(),
        },
    }
    atomic.write_json(run_dir / "metrics.json", metrics)
    report.write_figures(
        run_dir, metrics, examples=_examples(raw_images, y, masks["train"], len(classes))
    )
    report_path = report.write_report(
        run_dir, metrics, config_yaml=OmegaConf.to_yaml(cfg, resolve=True)
    )
    print(report.summary_table(metrics))
    print(f"report: {report_path}")
    return metrics


def _build(cfg: DictConfig, name: str, *, n_classes: int, in_channels: int, seed: int):
    torch.manual_seed(seed)  # the same initial draw for the ResNet and its plain twin
    node = cfg[name]
    try:
        if "SVM" in node._target_:
            return instantiate(node, _convert_="all")
        return instantiate(node, num_classes=n_classes, in_channels=in_channels, _convert_="all")
    except Exception as err:  # Hydra wraps the builder's ValueError in InstantiationException
        cause = err.__cause__ or err
        if isinstance(cause, ValueError):
            raise ConfigError(f"{name}: {cause}") from err
        raise


def _n_params(model) -> int:
    if isinstance(model, nn.Module):
        return sum(p.numel() for p in model.parameters())
    return int(model.n_params_)


def _jsonable(v):
    return v.item() if isinstance(v, np.generic) else v


def _quote(arg: str) -> str:
    return f'"{arg}"' if any(ch in arg for ch in " ()[]'*?$") else arg


def _examples(
    raw_images: np.ndarray, y: np.ndarray, train_mask: np.ndarray, n_classes: int
) -> np.ndarray:
    """One un-normalised training image per class: (n_classes, channels, H, W)."""
    picks = [
        np.flatnonzero(train_mask & (y == c))[0]
        for c in range(n_classes)
        if (train_mask & (y == c)).any()
    ]
    return raw_images[picks]


def _write_predictions(path: Path, paths, starts, y_true, scores, classes) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["path", "segment_start_seconds", "true", "predicted", *[f"score_{c}" for c in classes]]
    )
    for p, s, t, row in zip(paths, starts, y_true, scores, strict=True):
        writer.writerow(
            [p, f"{s:.6g}", classes[t], classes[int(row.argmax())], *[f"{v:.6g}" for v in row]]
        )
    atomic.write_text(path, buf.getvalue())
