"""The main job: train ResNet, its plain twin and the SVM on one split and compare them.

signal files -> records -> split by recording -> windows -> STFT images ->
normalise (training statistics) -> fit each model -> evaluate on the test split ->
bundles, predictions, metrics.json (with McNemar's tests between the models), figures,
report.md and report.html.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from pipeline import atomic, calibration, explain, report
from pipeline.adapt import ADAPT_BN, Decision, adapted_logits, decide
from pipeline.adapt import AUTO as ADAPT_AUTO
from pipeline.bundle import package_versions, save_bundle
from pipeline.data.dataset import iter_windows, probe_length
from pipeline.data.records import Record, find_records
from pipeline.data.split import SPLITS, split_records
from pipeline.data.synthetic import ensure_dataset
from pipeline.errors import ConfigError, DataError, SignalError, config_keys
from pipeline.features import cache as feature_cache
from pipeline.features.extract import Extracted, extract_images
from pipeline.features.stft import (
    AUTO,
    STFTParams,
    auto_size,
    auto_sizes,
    check_per_group,
)
from pipeline.features.store import ImageFile, ImageWriter, storage_dtype
from pipeline.features.view import ImageView, centred_by_group
from pipeline.fit import MIN_VAL_PER_CLASS, TrainSettings
from pipeline.frontend import WINDOW_NORMS, Frontend, Segmenting, segmenting
from pipeline.metrics import classification_metrics, file_level_predictions, pairwise_mcnemar
from pipeline.models.base import Context, build
from pipeline.runtime import (
    available_memory,
    precision,
    rank_and_world,
    reading_workers,
    resolve_device,
    setup_distributed,
)
from pipeline.signals import AUDIO_SUFFIXES, read_signal
from pipeline.tracking import NullTracker, Tracker, open_tracker
from pipeline.values import is_number, is_whole

log = logging.getLogger(__name__)

# features.in_memory=auto holds the normalised images when they take less than this share of
# the memory available (shared by torchrun's processes on one machine): the rest is for the
# models, their batches and the evaluation.
MEMORY_SHARE = 0.25
# The figures of a network's adapted test evaluation (evaluate.adapt_bn), as adapted_<key>.
ADAPTED = ("accuracy", "balanced_accuracy", "macro_f1", "file_accuracy")


SIZES = ("n_fft", "hop_length", "win_length")


def command_line_keys() -> set[str]:
    """The keys this run's command line sets (Hydra's task overrides), e.g.
    ``{"features.hop_length"}``; empty outside a Hydra run."""
    if not HydraConfig.initialized():
        return set()
    keys = (o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task)
    return set(keys)


def configured_sizes(
    cfg: DictConfig, *, explicit: set[str] | None = None, verbose: bool = False
) -> dict:
    """``n_fft``, ``hop_length`` and ``win_length`` as configured, with the inherited ones
    turned to ``auto`` when ``n_fft`` is (see :func:`stft_params`)."""
    explicit = command_line_keys() if explicit is None else explicit
    sizes = {k: cfg.features[k] for k in SIZES}
    for key, value in sizes.items():
        if isinstance(value, str) and value != AUTO:
            raise ConfigError(f"features.{key}={value!r} must be a positive integer or auto")
    if sizes["n_fft"] == AUTO:
        inherited = [k for k in SIZES[1:] if sizes[k] != AUTO and f"features.{k}" not in explicit]
        if inherited and verbose:
            log.info(
                "features.n_fft=auto: %s from the preset follow the window too (set them on "
                "the command line to keep them)",
                ", ".join(f"{k}={sizes[k]}" for k in inherited),
            )
        sizes.update(dict.fromkeys(inherited, AUTO))
    return sizes


# The config keys of the STFT parameters that live outside the ``features`` group.
FEATURE_KEYS = {"sample_rate": "data.sample_rate", "length_seconds": "data.segment.length_seconds"}


def stft_params(
    cfg: DictConfig,
    *,
    sample_rate: int | None = None,
    segment_samples: int | None = None,
    explicit: set[str] | None = None,
) -> STFTParams:
    """The ``features`` config group as :class:`STFTParams` (validated).

    ``auto`` sizes are chosen by :func:`~pipeline.features.stft.auto_sizes` for
    windows of ``segment_samples`` at ``sample_rate`` and logged. Before the data is
    read both are None: auto sizes then take a stand-in (2,048 samples at 4 kHz) and
    the checks that need the rate wait, so a bad setting fails before any file is read.

    With ``n_fft=auto``, a ``hop_length`` or ``win_length`` that a preset fixed (a
    number chosen for the preset's own n_fft) follows the window too, unless it is in
    ``explicit`` (the keys the command line sets, :func:`command_line_keys`): a
    ``win_length`` of 256 must not pin the FFT of a 150-sample trace.
    """
    f = cfg.features
    sizes = configured_sizes(cfg, explicit=explicit, verbose=segment_samples is not None)
    chosen = auto_sizes(
        segment_samples=segment_samples or 2048, sample_rate=sample_rate or 4000, **sizes
    )
    if segment_samples is not None and AUTO in sizes.values():
        picked = zip(sizes.items(), chosen, strict=True)
        log.info(
            "features: %s for %d-sample windows at %d Hz",
            ", ".join(f"{k}=auto -> {v}" for (k, a), v in picked if a == AUTO),
            segment_samples,
            sample_rate,
        )
    with config_keys("features.", names=FEATURE_KEYS):
        params = feature_params(f, chosen, sample_rate=sample_rate)
        if segment_samples is not None:
            fixed = tuple(k for k, v in sizes.items() if v != AUTO)
            params.check_fits(segment_samples, chosen=fixed)
    if f.size == AUTO and (sample_rate is not None or not params.uses_band):
        # (a frequency crop needs the rate: before it is known the size waits for it)
        params = replace(params, size=auto_size(params, segment_samples or 2048))
        if segment_samples is not None:
            native = (params.n_freq(), params.n_frames(segment_samples))
            log.info("features: size=auto -> %s (native %s)", list(params.size), list(native))
    return params


def feature_params(
    f: DictConfig, sizes: tuple[int, int, int], *, sample_rate: int | None
) -> STFTParams:
    """The ``features`` group with the (chosen) n_fft, hop and window lengths."""
    return STFTParams(
        n_fft=sizes[0],
        hop_length=sizes[1],
        win_length=sizes[2],
        window=f.window,
        center=f.center,
        pad_mode=f.pad_mode,
        power=f.power,
        scale=f.scale,
        top_db=f.top_db,
        size=configured_size(f.size),
        sample_rate=sample_rate,
        n_mels=f.n_mels,
        f_min=float(f.f_min),
        f_max=float(f.f_max) if f.f_max is not None else None,
        mel_scale=f.mel_scale,
        norm=f.norm,
        lifter=f.lifter,
        dtype=str(storage_dtype(f.get("dtype", "auto"), scale=f.scale)),
    )


def configured_size(size) -> tuple[int, int] | None:
    """``features.size`` as (height, width), or None for ``auto`` (chosen with the data) and
    null (the native size).

    Raises:
        ConfigError: anything else than a list, auto or null.
    """
    if size == AUTO or size is None:
        return None
    if not OmegaConf.is_list(size):
        raise ConfigError(
            f"features.size={size!r} must be [height, width], auto (the native size, at most "
            "[64, 64]) or null (the native size)"
        )
    return tuple(OmegaConf.to_object(size))


def auto_keys(cfg: DictConfig) -> list[str]:
    """The feature settings chosen from the data (``auto``), for metrics.json."""
    sizes = configured_sizes(cfg)
    return [k for k in SIZES if sizes[k] == AUTO] + (["size"] if cfg.features.size == AUTO else [])


def train_settings(cfg: DictConfig, name: str | None = None) -> TrainSettings:
    """The ``train`` config group as :class:`TrainSettings` (validated); with ``name``, model
    ``name``'s recipe: its node's ``train`` settings over the group's (the 1-D ResNet's Adam)."""
    t = OmegaConf.to_container(cfg.train, resolve=True)
    own = cfg[name].get("train") if name is not None else None
    known = TrainSettings.__dataclass_fields__
    group = {}  # where each of the model's own settings is spelt, for the messages
    if own is not None:
        own = OmegaConf.to_container(own, resolve=True)
        group = {k: f"{name}.train.{k}" for k in own}
        t = OmegaConf.to_container(OmegaConf.merge(t, own), resolve=True)
    unknown = sorted(set(t) - set(known))
    if unknown:
        key = group.get(unknown[0], f"train.{unknown[0]}")
        raise ConfigError(f"{key} is not a training setting; known: {sorted(known)}")
    if isinstance(t.get("milestones"), list):
        t["milestones"] = tuple(t["milestones"])
    with config_keys("train.", names=group):
        return TrainSettings(**t)


def group_list(d: DictConfig, key: str) -> list[str] | None:
    """``data.test_groups`` or ``data.val_groups`` as group names (strings: groups come from
    file names, so ``[1]`` means the group ``"1"``), or None.

    Raises:
        ConfigError: the value is not a list.
    """
    value = d.get(key)
    if value is None:
        return None
    if not OmegaConf.is_list(value):
        raise ConfigError(
            f"data.{key}={value!r} must be a list of group names, e.g. [{value}], or null"
        )
    return [str(g) for g in value]


def check_switches(cfg: DictConfig) -> None:
    """The true/false settings of the run are booleans (Hydra passes ``maybe`` as a string).

    Raises:
        ConfigError: naming the key.
    """
    keys = ["progress", "data.segment.pad", "features.center", "features.cache"]
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
    for key in ("seed", "data.split_seed"):
        value = OmegaConf.select(cfg, key)
        if not is_whole(value):
            raise ConfigError(f"{key}={value!r} must be a whole number 0 or above")
    norm = OmegaConf.select(cfg, "features.raw_normalize")
    if norm is not None and norm not in WINDOW_NORMS:
        raise ConfigError(
            f"features.raw_normalize={norm!r} must be window (each window by its own mean and "
            "std) or global (the training windows' mean and std per channel)"
        )
    batch = OmegaConf.select(cfg, "features.batch_size")
    if batch is not None and not is_whole(batch, minimum=1):
        raise ConfigError(f"features.batch_size={batch!r} must be a positive number of windows")


def check_storage(cfg: DictConfig) -> None:
    """``features.in_memory`` and ``data.workers`` are values they take (``features.dtype``
    is checked with the other feature settings).

    Raises:
        ConfigError: naming the key.
    """
    reading_workers(cfg.data.get("workers", "auto"), key="data.workers")
    f = cfg.features
    held = f.get("in_memory", "auto")
    if held != "auto" and not isinstance(held, bool):
        raise ConfigError(
            f"features.in_memory={held!r} must be auto (hold the normalised images when they "
            f"take under {MEMORY_SHARE:g} of the memory available), true or false (read each "
            "batch from the feature cache on disk)"
        )


def feature_summary(data: Prepared, held: bool) -> dict:
    """The ``dataset.features`` section of metrics.json: how the images were made and kept."""
    images = data.extracted.images
    on_disk = isinstance(images, ImageFile)
    return {
        "seconds": data.seconds,
        "cache_hit": data.cache_hit,
        "files_per_second": None if data.cache_hit else len(data.records) / max(data.seconds, 1e-9),
        "dtype": str(images.dtype),
        "cache_bytes": images.nbytes if on_disk else None,
        "in_memory": held,
    }


def check_data_settings(d: DictConfig) -> None:
    """The ``data`` group's numbers are numbers, before any file is read.

    Raises:
        ConfigError: naming the key, the value and what it must be.
    """
    rate = d.get("sample_rate")
    if rate is not None and not is_whole(rate, minimum=1):
        raise ConfigError(
            f"data.sample_rate={rate!r} must be a positive whole number of samples per second "
            "(1 for series without a rate), or null for the rate of the first audio file"
        )
    for key in ("length_seconds", "hop_seconds"):
        value = d.segment.get(key)
        if value is not None and not (is_number(value) and value > 0):
            raise ConfigError(
                f"data.segment.{key}={value!r} must be a positive number of seconds (of "
                "samples with data.sample_rate=1), or null"
                + (" for whole files" if key == "length_seconds" else " for no overlap")
            )
    for key in ("val_fraction", "test_fraction"):
        value = d.get(key)
        if value is not None and not (is_number(value) and 0 <= value < 1):
            raise ConfigError(f"data.{key}={value!r} must be a number in [0, 1), e.g. 0.15")


# Settings that change where or how fast the images are made, not what the weights learn.
UNFINGERPRINTED = (
    "data.workers",
    "features.in_memory",
    "features.cache",
    "features.cache_dir",
    "features.cache_max_gb",
    "features.cache_verify",
    "features.batch_size",
    "train.resume",
    "train.compile",
    "train.channels_last",
)


def fingerprint(cfg: DictConfig, name: str, records: list[Record], classes: list[str]) -> dict:
    """What model ``name`` is trained on, {setting: JSON text}, for its checkpoint.

    The classes, the files (their paths, sizes and labels, as one digest), the
    seed, and every data, feature, model and training setting, so resuming can
    name the first one that differs. The training settings are the model's own: the
    train group's under the model's ``train:`` block, where it has one, so a group
    setting the block overrides does not count.
    """
    files = [[str(r.path), r.label, feature_cache.file_identity(r.path)[1]] for r in records]
    digest = hashlib.sha256(json.dumps(files).encode("utf-8")).hexdigest()[:12]

    def settings(prefix: str) -> dict:
        return _flatten(OmegaConf.to_container(cfg[prefix], resolve=True), prefix)

    train = OmegaConf.to_container(cfg.train, resolve=True)
    if cfg[name].get("train") is not None:
        train = OmegaConf.to_container(OmegaConf.merge(cfg.train, cfg[name].train), resolve=True)

    flat = {
        **settings("data"),
        **settings("features"),
        "classes": classes,
        "data.files": f"{len(files)} files, sha256 {digest}",
        "seed": cfg.seed,
        **settings(name),
        **_flatten(train, "train"),
    }
    return {
        k: json.dumps(v, sort_keys=True, default=str)
        for k, v in flat.items()
        if k not in UNFINGERPRINTED
    }


def _flatten(node, prefix: str) -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}"))
    return out


def model_names(cfg: DictConfig) -> list[str]:
    """The ``models`` list, each name checked against the configured models."""
    configured = [k for k, v in cfg.items() if isinstance(v, DictConfig) and "_target_" in v]
    names = [cfg.models] if isinstance(cfg.models, str) else list(cfg.models)  # models=svm
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


@dataclass
class Prepared:
    """The dataset as images, with everything the outputs need to describe it."""

    records: list[Record]
    classes: list[str]
    extracted: Extracted
    frontend: Frontend  # not fitted yet: the normaliser needs the split
    ignored: dict[str, int]
    layout: str
    strategy: str
    seconds: float
    cache_key: str | None
    cache_hit: bool


def read_settings(d: DictConfig) -> dict:
    """Keyword arguments of :func:`pipeline.signals.read_signal` from the ``data`` group."""
    channels = OmegaConf.to_object(d.channels) if OmegaConf.is_list(d.channels) else d.channels
    listed = isinstance(channels, list) and channels and all(is_whole(c) for c in channels)
    if not (channels in ("mix", "all") or listed):
        raise ConfigError(
            f"data.channels={channels!r} must be mix (their mean), all, or a non-empty list of "
            "channel indices counted from 0, e.g. [0] or [0,2] (negative indices would pick "
            "different channels in files of different channel counts)"
        )
    columns = OmegaConf.to_object(d.csv_columns) if d.get("csv_columns") is not None else None
    return {
        "channels": channels,
        "mat_key": d.get("mat_key"),
        "npz_key": d.get("npz_key"),
        "csv_columns": columns,
        "channel_axis": d.get("channel_axis", "auto"),
    }


def prepare_data(
    cfg: DictConfig, *, device: torch.device, progress: bool, keep_windows: bool = False
) -> Prepared:
    """Find, split (by recording), read, segment and turn the dataset into images.

    The front end is resolved here, where the window length is known (``auto``
    sizes), and the images come from the feature cache when ``features.cache`` is
    true and an entry for these files and settings exists. ``keep_windows`` keeps the
    raw windows too (for models that take them), computed afresh: the cache holds images.
    """
    d = cfg.data
    if d.get("generate"):
        generate(d)
    found = find_records(
        d.root,
        label_regex=d.get("label_regex"),
        group_regex=d.get("group_regex"),
        manifest=d.get("manifest"),
    )
    records = found.records
    with config_keys("data."):
        splits = split_records(
            records,
            strategy=d.split,
            val_fraction=d.val_fraction,
            test_fraction=d.test_fraction,
            seed=d.split_seed,
            test_regex=d.get("test_regex"),
            test_groups=group_list(d, "test_groups"),
            val_groups=group_list(d, "val_groups"),
        )
    read = read_settings(d)
    rate = d.sample_rate if d.sample_rate is not None else native_rate(records)
    t0 = time.perf_counter()
    lookup = extract_cached(
        cfg,
        records,
        splits,
        rate=rate,
        read=read,
        device=device,
        progress=progress,
        keep_windows=keep_windows,
    )
    frontend = resolved_frontend(cfg, lookup, rate=rate, read=read)
    return Prepared(
        records,
        found.classes,
        lookup.extracted,
        frontend,
        found.ignored,
        found.layout,
        split_strategy(d.split, records),
        time.perf_counter() - t0,
        lookup.key,
        lookup.hit,
    )


def resolved_frontend(
    cfg: DictConfig, lookup: feature_cache.Lookup, *, rate: int, read: dict
) -> Frontend:
    """The front end whose settings (auto sizes, whole-file length) the extraction or the
    cache entry resolved."""
    frontend = Frontend(
        sample_rate=rate,
        segmenting=Segmenting(**lookup.info["segment"]),
        params=STFTParams.from_dict(lookup.info["features"]),
        read=read,
    )
    if lookup.hit and auto_keys(cfg):
        p = frontend.params
        log.info(
            "features: auto sizes from the cache entry: n_fft=%d, hop_length=%d, win_length=%d",
            p.n_fft,
            p.hop_length,
            p.win_length,
        )
    return frontend


def extract_cached(
    cfg: DictConfig,
    records: list[Record],
    splits: list[str],
    *,
    rate: int,
    read: dict,
    device: torch.device,
    progress: bool,
    keep_windows: bool = False,
) -> feature_cache.Lookup:
    """The images of every window, from the feature cache or computed through the run's
    front end (:func:`build_frontend`), with the current split applied."""
    d = cfg.data

    def compute(folder: Path | None) -> tuple[Extracted, dict]:
        frontend = build_frontend(cfg, records, rate=rate, read=read)
        source = iter_windows(
            records,
            splits,
            frontend,
            val_fraction=d.val_fraction,
            test_fraction=d.test_fraction,
            progress=progress,
            workers=reading_workers(d.get("workers", "auto"), key="data.workers"),
        )
        ex = extract_images(
            source,
            frontend,
            n_records=len(records),
            device=device,
            batch_size=cfg.features.batch_size,
            keep_windows=keep_windows,
            sink=ImageWriter(folder / "images.npy", frontend.params.dtype) if folder else None,
        )
        return ex, {"segment": asdict(frontend.segmenting), "features": frontend.params.to_dict()}

    timed = np.asarray(splits) == "time"
    if keep_windows and cfg.features.cache:
        log.info("features.cache: not used, a model takes the raw windows, which it does not hold")
    root = Path(cfg.features.cache_dir) if cfg.features.cache and not keep_windows else None
    with rank_zero_first(root is not None):
        lookup = feature_cache.cached(
            compute,
            root=root,
            files=[r.path for r in records],
            settings=cache_settings(cfg, rate, read, timed),
            max_bytes=cache_limit(cfg.features),
            verify=bool(cfg.features.get("cache_verify", True)),
        )
    ex = lookup.extracted
    # Only the time split decides which windows a file gives (it is in the key); any other
    # split is a label per file, applied here, so a new split seed reuses the entry.
    ex.split = np.where(timed[ex.record], ex.split, np.asarray(splits)[ex.record])
    return lookup


@contextlib.contextmanager
def rank_zero_first(shared: bool) -> Iterator[None]:
    """Under torchrun, with a ``shared`` result (the feature cache), rank 0 runs the block
    while the other ranks wait, then they run it (and find its entry)."""
    rank, world = rank_and_world()
    wait = shared and world > 1
    if wait and rank != 0:
        torch.distributed.barrier()
    yield
    if wait and rank == 0:
        torch.distributed.barrier()


def split_strategy(split: str, records: list[Record]) -> str:
    """``data.split``, with ``auto`` resolved: folders where files sit in split folders."""
    if split != "auto":
        return split
    return "folders" if any(r.split for r in records) else "random"


def generate(d: DictConfig) -> None:
    """Write the synthetic dataset ``data.generate`` describes (rank 0; the others wait)."""
    rank, world = rank_and_world()
    if rank == 0:
        ensure_dataset(d.root, **OmegaConf.to_container(d.generate, resolve=True))
    if world > 1:  # the other ranks read the files once rank 0 has written them
        torch.distributed.barrier()


def build_frontend(cfg: DictConfig, records: list[Record], *, rate: int, read: dict) -> Frontend:
    """The run's front end (not fitted): windows from ``data.segment`` (whole files: the
    longest file's length), images from ``features`` with ``auto`` sizes for that window."""
    d = cfg.data
    whole = None
    if d.segment.length_seconds is None:
        whole = whole_length(records, rate=rate, read=read)
    seg = segmenting(
        sample_rate=rate,
        length_seconds=d.segment.length_seconds,
        hop_seconds=d.segment.hop_seconds,
        pad=d.segment.pad,
        whole_length=whole,
    )
    params = stft_params(cfg, sample_rate=rate, segment_samples=seg.length)
    return Frontend(sample_rate=rate, segmenting=seg, params=params, read=read)


def cache_settings(cfg: DictConfig, rate: int, read: dict, timed: np.ndarray) -> dict:
    """The feature cache's key: the settings as configured. Whole-file lengths and auto
    sizes follow from the files and these settings alone, and come back resolved in the
    entry, so a hit opens no file."""
    d = cfg.data
    features = OmegaConf.to_container(cfg.features, resolve=True)
    time_split = {
        "files": timed.tolist(),
        "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction,
    }
    return {
        "sample_rate": rate,
        "read": read,
        "segment": OmegaConf.to_container(d.segment, resolve=True),
        "time_split": time_split if timed.any() else None,
        "features": {
            **{k: features[k] for k in STFTParams.__dataclass_fields__ if k in features},
            **configured_sizes(cfg),  # what auto covers decides the images
        },
    }


def cache_limit(f: DictConfig) -> int | None:
    """``features.cache_max_gb`` in bytes; None for no limit."""
    max_gb = f.get("cache_max_gb")
    if max_gb is not None and not max_gb > 0:
        raise ConfigError(
            f"features.cache_max_gb={max_gb!r} must be a positive size in GB, or null for no limit"
        )
    return None if max_gb is None else int(max_gb * 1e9)


# Whole-file mode pads every file to the longest: one far longer than the others would shrink
# every other file to a sliver of its image (a 10-minute file among 0.5 s clips took the
# accuracy from 1.0 to 0.67), so it is refused.
MAX_LENGTH_RATIO = 20


def whole_length(records: list[Record], *, rate: int, read: dict) -> int:
    """The length whole files are padded to: the longest file's, in samples.

    Raises:
        DataError: the longest file is more than :data:`MAX_LENGTH_RATIO` times the median.
    """
    lengths = [probe_length(r.path, sample_rate=rate, read=read) for r in records]
    known = [(n, r.path) for n, r in zip(lengths, records, strict=True) if n]
    if not known:
        raise DataError(unreadable(records, rate=rate, read=read))
    longest, path = max(known, key=lambda k: k[0])
    median = float(np.median([n for n, _ in known]))
    if longest > MAX_LENGTH_RATIO * median:
        raise DataError(
            f"{path} is {longest / rate:.4g} s long, {longest / median:.0f} times the median "
            f"file ({median / rate:.4g} s); with data.segment.length_seconds=null every file "
            f"is padded to the longest, so the others would fill a sliver of their images. "
            f"Cut windows instead (e.g. data.segment.length_seconds={median / rate:.3g}), "
            "trim or remove that file, or set data.segment.length_seconds to the longest "
            "length to pad every file to it anyway"
        )
    return longest


def unreadable(records: list[Record], *, rate: int, read: dict) -> str:
    """Why none of ``records`` can be read: their count and the first file's reason."""
    reason = "(no reason given)"
    try:
        read_signal(records[0].path, sample_rate=rate, **read)
    except SignalError as err:
        reason = str(err)
    return f"none of the {len(records)} files can be read; the first: {reason}"


def native_rate(records: list[Record]) -> int:
    """The sample rate of the first audio file, used when ``data.sample_rate`` is null.

    Raises:
        ConfigError: no audio file tells its rate (arrays, text and MATLAB files have none).
    """
    for r in records:
        if r.path.suffix.lower() in AUDIO_SUFFIXES:
            try:
                rate = sf.info(os.fsencode(r.path)).samplerate
            except (RuntimeError, sf.LibsndfileError):
                continue
            log.info("data.sample_rate=null: working at %d Hz, the rate of %s", rate, r.path)
            return int(rate)
    audio = [r for r in records if r.path.suffix.lower() in AUDIO_SUFFIXES]
    if audio:
        raise DataError(
            f"data.sample_rate=null takes the rate of the first readable audio file, but "
            f"{unreadable(audio, rate=1, read={})}"
        )
    raise ConfigError(
        "data.sample_rate=null, but no audio file gives a rate (arrays, text and MATLAB files "
        "have none); set data.sample_rate to the rate the signals were recorded at"
    )


def _groups_per_split(records, ex, masks) -> dict[str, list[str]] | None:
    """Which groups (speakers, machines) each split holds; None when files carry none."""
    groups = np.array([r.group for r in records], dtype=object)
    if all(g is None for g in groups):
        return None
    window_groups = groups[ex.record]
    return {s: sorted({str(g) for g in window_groups[masks[s]] if g is not None}) for s in SPLITS}


def dataset_summary(cfg: DictConfig, data: Prepared, masks: dict[str, np.ndarray]) -> dict:
    """The ``dataset`` section of metrics.json."""
    ex, records = data.extracted, data.records
    labels = np.array([r.label for r in records])
    window_labels = labels[ex.record]
    used = ex.file_samples >= 0
    per = {}
    for c in data.classes:
        per[c] = {}
        for s in SPLITS:
            m = masks[s] & (window_labels == c)
            per[c][s] = {"files": len(set(ex.record[m].tolist())), "segments": int(m.sum())}
    rates = ex.file_rates[used]
    seconds = ex.file_samples[used] / data.frontend.sample_rate
    return {
        "name": cfg.data.name,
        "root": str(cfg.data.root),
        "layout": data.layout,
        "split": data.strategy,
        "classes": data.classes,
        "n_train": int(masks["train"].sum()),
        "n_val": int(masks["val"].sum()),
        "n_test": int(masks["test"].sum()),
        "files": {s: sum(per[c][s]["files"] for c in data.classes) for s in SPLITS},
        "groups": _groups_per_split(records, ex, masks),
        "per_class": per,
        "n_files": len(records),
        "skipped": [{"path": str(s.path), "reason": s.reason} for s in ex.skipped],
        "n_skipped": len(ex.skipped),
        "ignored": data.ignored,
        "sample_rate": data.frontend.sample_rate,
        "source_rates": {str(int(r)): int((rates == r).sum()) for r in np.unique(rates)},
        "resampled": int((rates != data.frontend.sample_rate).sum()),
        "duration_seconds": {
            "min": float(seconds.min()),
            "median": float(np.median(seconds)),
            "max": float(seconds.max()),
            "total": float(seconds.sum()),
        },
        "segment_samples": data.frontend.segmenting.length,
        "hop_samples": data.frontend.segmenting.hop,
    }


def run(cfg: DictConfig, *, run_dir: Path) -> dict:
    """Run the comparison and write its outputs into ``run_dir``.

    Stages: validate the configuration (before any file is read), prepare the data (split,
    images, normalisation), train and evaluate each model, write the outputs.

    Returns:
        The contents of ``metrics.json`` (empty on ranks other than 0 under torchrun).
    """
    job = validate(cfg, run_dir=run_dir)
    job.tracker = open_tracker(**cfg.get("logger", {}), run_dir=run_dir, rank=job.rank)
    with job.tracker:  # closed as failed on an error, killed on Ctrl-C
        job.tracker.log_config(OmegaConf.to_container(cfg, resolve=True))
        split = prepare(cfg, job)
        out = Outcome()
        for name in job.names:
            train_and_evaluate(cfg, job, split, name, out)
        if job.rank != 0:
            return {}
        metrics = assemble_metrics(cfg, job, split, out)
        write_outputs(run_dir, metrics, split)
        job.tracker.log_metrics(metrics)
        job.tracker.log_artifacts(run_dir)
    return metrics


@dataclass
class Job:
    """The validated settings of one comparison run."""

    names: list[str]
    settings: TrainSettings
    device: torch.device
    rank: int  # under torchrun only rank 0 writes files
    adapt_bn: bool | str
    run_dir: Path
    checkpoints: Path
    inputs: dict[str, str] = field(default_factory=dict)  # each model's: image or raw
    recipes: dict[str, TrainSettings] = field(default_factory=dict)  # each model's training
    tracker: Tracker = field(default_factory=NullTracker)  # logger=...: rank 0's, else null

    def recipe(self, name: str) -> TrainSettings:
        """Model ``name``'s training settings (its own ``train`` over the group's)."""
        return self.recipes.get(name, self.settings)

    @property
    def raw(self) -> bool:
        """Whether a model takes the raw windows (then they are kept beside the images)."""
        return "raw" in self.inputs.values()


def validate(cfg: DictConfig, *, run_dir: Path) -> Job:
    """Check every setting that can be checked before a file is read; join torchrun's group.

    Raises:
        ConfigError: naming the first bad setting.
    """
    names = model_names(cfg)
    check_data_settings(cfg.data)
    check_switches(cfg)
    check_storage(cfg)
    params = stft_params(cfg)  # a bad feature setting fails now; auto sizes come with the data
    d = cfg.data
    if d.sample_rate is not None and d.segment.length_seconds is not None:
        chosen = tuple(k for k, v in configured_sizes(cfg).items() if v != AUTO)
        if {"n_fft", "win_length"} & set(chosen):
            with config_keys("features.", names=FEATURE_KEYS):
                params.check_fits(round(d.segment.length_seconds * d.sample_rate), chosen=chosen)
    adapt_bn = check_grouping(cfg)
    explain_settings(cfg)  # a bad explain.* setting fails before any file is read
    settings = train_settings(cfg)
    checkpoints = run_dir / "checkpoints"
    if isinstance(settings.resume, str):
        checkpoints = Path(settings.resume) / "checkpoints"
        if not checkpoints.is_dir():
            raise ConfigError(
                f"train.resume={settings.resume!r} holds no checkpoints/ folder; give the run "
                "folder of the interrupted run, or train.resume=true with its hydra.run.dir"
            )
    device = setup_distributed(resolve_device(cfg.device))
    rank, _ = rank_and_world()
    # a bad model setting fails now, not after the data is read
    inputs = {
        n: build(cfg[n], name=n, n_classes=2, in_channels=1, seed=cfg.seed).input for n in names
    }
    log.info(
        "device %s (%s), models %s, run folder %s",
        device,
        precision(device, settings.amp),
        names,
        run_dir,
    )
    recipes = {n: train_settings(cfg, n) for n in names if cfg[n].get("train") is not None}
    return Job(names, settings, device, rank, adapt_bn, run_dir, checkpoints, inputs, recipes)


def check_grouping(cfg: DictConfig) -> bool | str:
    """``features.per_group`` and ``evaluate.adapt_bn``, checked; returns the latter.

    Raises:
        ConfigError: a value outside the rule, or one that needs groups the data lacks.
    """
    per_group = cfg.features.get("per_group", False)
    with config_keys("features."):
        check_per_group(per_group)
    adapt_bn = cfg.get("evaluate", {}).get("adapt_bn", ADAPT_AUTO)
    if adapt_bn not in (*ADAPT_BN, ADAPT_AUTO):
        raise ConfigError(
            f"evaluate.adapt_bn={adapt_bn!r} must be auto (when the test split holds groups "
            "training never saw), group (always) or false: also evaluate the networks with "
            "batch-norm statistics re-estimated on each test group's own images"
        )
    forced = adapt_bn if adapt_bn == "group" else False
    for key, value in (("features.per_group", per_group), ("evaluate.adapt_bn", forced)):
        if value and not cfg.data.get("group_regex") and not cfg.data.get("manifest"):
            raise ConfigError(
                f"{key}={value} needs each file's group (speaker, microphone): set "
                "data.group_regex, e.g. '^\\d+_([a-z]+)_' for 7_jackson_32.wav, or give a "
                "data.manifest with a group column"
            )
    return adapt_bn


@dataclass
class Split:
    """The prepared data: images by split, labels, and what the outputs need of the test split.

    Attributes:
        data: the dataset as read (records, classes, raw images, settings).
        y: class index of every window.
        masks: {split: (n,) bool}.
        summary: the dataset section of metrics.json.
        frontend: the run's front end, its normaliser fitted on the training images.
        images: the normalised images of every window, a view read a batch at a time.
        tensors: {split: (images, labels)}: the images held in a tensor, or a view of them
            on disk (``features.in_memory``, :func:`hold_in_memory`).
        raw: {split: (standardised windows, labels)} where a model takes raw windows.
        test_groups: each test window's group ("" for none).
        decision: whether the networks are also evaluated adapted.
        data_settings: what the bundle keeps of the data beyond the front end (the groups).
    """

    data: Prepared
    y: np.ndarray
    masks: dict[str, np.ndarray]
    summary: dict
    frontend: Frontend
    images: ImageView
    tensors: dict[str, tuple[Tensor | ImageView, Tensor]]
    test_groups: np.ndarray
    decision: Decision
    data_settings: dict
    raw: dict[str, tuple[Tensor, Tensor]] | None = None

    def inputs(self, kind: str) -> dict[str, tuple[Tensor, Tensor]]:
        """{split: (inputs, labels)} for a model whose input is ``kind`` (image or raw)."""
        return self.raw if kind == "raw" else self.tensors

    @cached_property
    def test_record(self) -> np.ndarray:
        return self.data.extracted.record[self.masks["test"]]

    @cached_property
    def test_paths(self) -> list[str]:
        return [str(self.data.records[i].path) for i in self.test_record]

    @cached_property
    def test_starts(self) -> np.ndarray:
        ex = self.data.extracted
        return ex.start[self.masks["test"]] / self.data.frontend.sample_rate

    @cached_property
    def segmented(self) -> bool:
        """Whether files were cut into several windows (then files are scored too)."""
        record = self.data.extracted.record
        return len(record) > len(set(record.tolist()))


def prepare(cfg: DictConfig, job: Job) -> Split:
    """Read, split and normalise the data; decide the adaptation."""
    data = prepare_data(cfg, device=job.device, progress=cfg.progress, keep_windows=job.raw)
    y, masks, merged = split_masks(data, job.settings)
    summary = dataset_summary(cfg, data, masks)
    summary["val_merged_into_train"] = merged
    if cfg.get("optimized_metric") and not masks["val"].any():  # never tune on a test figure
        fix = "set data.val_fraction (e.g. 0.2) or data.val_groups"
        if merged:
            fix = f"train.monitor=auto trains on its {merged}; set train.monitor=val_accuracy"
        raise ConfigError(
            f"optimized_metric={cfg.optimized_metric} is a validation figure, and this split "
            f"has no validation windows; {fix}"
        )
    ex = data.extracted
    if job.rank == 0:
        _write_skipped(job.run_dir / "skipped.csv", ex.skipped)
    log.info(
        "%d classes, %d files (%d skipped) -> windows: train %d, val %d, test %d",
        len(data.classes),
        len(data.records),
        len(ex.skipped),
        *(int(masks[s].sum()) for s in SPLITS),
    )
    frontend, images = normalise(cfg, data, masks)
    log.info(
        "images %s %s in %.2f s",
        images.shape[1:],
        "loaded from the feature cache" if data.cache_hit else "computed",
        data.seconds,
    )
    held = hold_in_memory(cfg, images, on_disk=isinstance(ex.images, ImageFile))
    tensors = {}
    for s in SPLITS:
        x = images.subset(np.flatnonzero(masks[s]))
        tensors[s] = (x.materialise() if held else x, torch.from_numpy(y[masks[s]]))
    summary["features"] = feature_summary(data, held)
    raw = None
    if job.raw:
        frontend, raw = raw_inputs(cfg, frontend, ex, masks, tensors)
    test_groups, decision = test_grouping(cfg, job, data, masks)
    return Split(
        data,
        y,
        masks,
        summary,
        frontend,
        images,
        tensors,
        test_groups,
        decision,
        bundle_data_settings(cfg, data, masks),
        raw,
    )


def test_grouping(
    cfg: DictConfig, job: Job, data: Prepared, masks: dict[str, np.ndarray]
) -> tuple[np.ndarray, Decision]:
    """Each test window's group ("" for none) and the adaptation decided for them.

    Raises:
        ConfigError: ``evaluate.adapt_bn=group`` and no test window has a group.
    """
    ex = data.extracted
    records = data.records
    test_groups = np.array([records[i].group or "" for i in ex.record[masks["test"]]], dtype=object)
    if job.adapt_bn == "group" and (test_groups == "").all():
        raise ConfigError(
            f"evaluate.adapt_bn={job.adapt_bn} needs each test file's group, and none of the "
            f"{len(test_groups)} test windows has one; set data.group_regex or add a group "
            "column to data.manifest"
        )
    decision = adaptation(cfg, data, masks, test_groups)
    if decision.apply and (test_groups == "").any():
        log.warning(
            "evaluate.adapt_bn: %d test window(s) have no group; they form one group whose "
            "batch-norm statistics are re-estimated together",
            int((test_groups == "").sum()),
        )
    return test_groups, decision


def raw_inputs(
    cfg: DictConfig,
    frontend: Frontend,
    ex: Extracted,
    masks: dict[str, np.ndarray],
    tensors: dict[str, tuple[Tensor, Tensor]],
) -> tuple[Frontend, dict[str, tuple[Tensor, Tensor]]]:
    """The front end with its raw-window standardisation fitted on the training windows
    (``features.raw_normalize``), and {split: (standardised windows, labels)}."""
    with config_keys("features.", names={"raw_normalize": "features.raw_normalize"}):
        frontend = frontend.fitted_windows(
            ex.windows[masks["train"]], mode=cfg.features.get("raw_normalize", "window")
        )
    windows = frontend.normalise_windows(ex.windows)
    return frontend, {s: (windows[masks[s]], tensors[s][1]) for s in SPLITS}


def split_masks(
    data: Prepared, settings: TrainSettings
) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Each window's class index and split masks; too small a validation split trains.

    Returns:
        ``(y, masks, merged)``: merged is the number of validation windows moved to training.

    Raises:
        ConfigError: a split is empty. DataError: a class has no training window.
    """
    records, classes, ex = data.records, data.classes, data.extracted
    label_index = {c: i for i, c in enumerate(classes)}
    y = np.array([label_index[records[i].label] for i in ex.record], dtype=np.int64)
    masks = {name: ex.split == name for name in SPLITS}
    n_val = int(masks["val"].sum())
    merged = 0
    if (
        settings.monitor == "auto"
        and settings.patience is None
        and (0 < n_val < MIN_VAL_PER_CLASS * len(classes))
    ):
        # A handful of validation windows cannot pick an epoch (one window moves the score by
        # more than the epochs differ), and the last epoch is kept anyway: they train instead.
        ex.split = np.where(ex.split == "val", "train", ex.split)
        masks = {name: ex.split == name for name in SPLITS}
        merged = n_val
        log.info(
            "train.monitor=auto: the %d validation windows (fewer than %d per class) are too "
            "few to pick an epoch, so they train the models too; set train.monitor=val_accuracy "
            "to keep them apart",
            n_val,
            MIN_VAL_PER_CLASS,
        )
    if not masks["train"].any() or not masks["test"].any():
        raise ConfigError(
            f"data.split={data.strategy} left {int(masks['train'].sum())} training and "
            f"{int(masks['test'].sum())} test windows; both must be non-empty"
        )
    for c, i in label_index.items():
        if not (masks["train"] & (y == i)).any():
            raise DataError(
                f"class {c!r} has no usable training window (its files were skipped or all "
                "went to other splits); see skipped.csv, add files or remove the class"
            )
    return y, masks, merged


def normalise(
    cfg: DictConfig, data: Prepared, masks: dict[str, np.ndarray]
) -> tuple[Frontend, ImageView]:
    """The front end with its normaliser fitted on the training images (read a chunk at a
    time), and a view of every image normalised with it (each group's frequency profile
    removed for ``features.per_group``); nothing of the images is held.

    Raises:
        ConfigError: ``features.per_group`` and a file without a group.
    """
    records, ex = data.records, data.extracted
    with config_keys("features.", names={"mode": "features.normalize"}):
        frontend = data.frontend.fitted(
            ImageView(ex.images, np.flatnonzero(masks["train"])),
            mode=cfg.features.normalize,
            per_image=cfg.features.get("per_image", False),
            per_group=cfg.features.get("per_group", False),
        )
    normalizer = frontend.normalizer
    images = ImageView(ex.images, np.arange(len(ex.images)), normalizer)
    if normalizer.per_group:
        groups = np.array([records[i].group for i in ex.record], dtype=object)
        missing = sorted({str(records[i].path) for i in ex.record[groups == None]})  # noqa: E711
        if missing:
            raise ConfigError(
                f"features.per_group={normalizer.per_group} needs every file's group, and "
                f"{missing[0]} has none ({len(missing)} file(s)); set data.group_regex "
                "(e.g. '^\\d+_([a-z]+)_' for 7_jackson_32.wav) or a manifest group column"
            )
        images = centred_by_group(images, groups)
        log.info(
            "features.per_group: each of %d groups' mean frequency profile removed",
            len(images.profiles),
        )
    return frontend, images


def hold_in_memory(cfg: DictConfig, images: ImageView, *, on_disk: bool) -> bool:
    """``features.in_memory``: whether the normalised images are held (auto: when they take
    under :data:`MEMORY_SHARE` of the memory available, counting a memory cgroup's limit,
    divided among torchrun's processes on this machine), or read a batch at a time from the
    feature cache on disk; logged with the reason. Without the cache (or a raw-window
    model's run) the images are in memory already."""
    setting = cfg.features.get("in_memory", "auto")
    need, free = images.nbytes, available_memory()
    share = MEMORY_SHARE / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not on_disk:
        held = True
        why = "no cache entry on disk: features.cache=false, a raw-window model or a full cache"
    elif setting == "auto":
        held = need < share * free
        why = (
            f"features.in_memory=auto: {need / 2**20:.0f} MB {'<' if held else '>='} "
            f"{share:g} x {free / 2**20:.0f} MB available"
        )
    else:
        held, why = bool(setting), f"features.in_memory={str(setting).lower()}"
    log.info(
        "normalised images %s (%s)",
        "held in memory" if held else "read a batch at a time from the feature cache",
        why,
    )
    return held


def bundle_data_settings(cfg: DictConfig, data: Prepared, masks: dict[str, np.ndarray]) -> dict:
    """What a bundle keeps of the data beyond the front end's settings: the groups."""
    records, ex = data.records, data.extracted
    return {
        # predict's default grouping for features.per_group, and the training files' groups,
        # against which predict checks its input's (test-time adaptation advice)
        "group_regex": cfg.data.get("group_regex"),
        "train_groups": sorted(
            {str(records[i].group) for i in ex.record[masks["train"]] if records[i].group}
        ),
    }


@dataclass
class Outcome:
    """What the models gave on the test split, gathered model by model."""

    results: dict[str, dict] = field(default_factory=dict)
    histories: dict[str, list[dict]] = field(default_factory=dict)
    predicted: dict[str, np.ndarray] = field(default_factory=dict)
    predicted_files: dict[str, np.ndarray] = field(default_factory=dict)  # files if cut
    y_files: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=int))
    adapted: dict[str, np.ndarray] = field(default_factory=dict)  # the networks', adapted
    explained: dict[str, dict] = field(default_factory=dict)  # maps and mistakes (explain.*)


def train_and_evaluate(cfg: DictConfig, job: Job, split: Split, name: str, out: Outcome) -> None:
    """Build, fit and test model ``name``; on rank 0 save its bundle and predictions."""
    data, classes = split.data, split.data.classes
    model = build(
        cfg[name],
        name=name,
        n_classes=len(classes),
        in_channels=split.images.shape[1],
        seed=cfg.seed,
    )
    tensors = split.inputs(model.input)
    x_te, y_te = tensors["test"]
    ctx = Context(
        settings=job.recipe(name),
        device=job.device,
        seed=cfg.seed,
        progress=cfg.progress,
        name=name,
        checkpoint=job.checkpoints / f"{name}.pt",
        resume=bool(job.recipe(name).resume),
        fingerprint=fingerprint(cfg, name, data.records, classes),
        tracker=job.tracker,
    )
    with config_keys("train."):  # a NaN loss, a checkpoint that cannot be resumed
        extra = model.fit(*tensors["train"], *tensors["val"], ctx=ctx)
    if model.history:
        out.histories[name] = model.history
    t0 = time.perf_counter()
    scores = model.scores(x_te, ctx=ctx)
    infer_seconds = time.perf_counter() - t0
    x_val, y_val = tensors["val"]
    val = (model.scores(x_val, ctx=ctx), y_val.numpy()) if len(x_val) else None
    # Temperature scaling on validation; from here on the scores are divided by T
    cal = calibrated(job, name, model, scores, y_te.numpy(), x_te, val=val, classes=classes)
    scores = cal.scores
    if split.decision.apply and model.adapts:
        extra.update(evaluate_adapted(cfg, job, split, name, model, out))
    m, by_file = _evaluate(scores, y_te.numpy(), split.test_record, classes, files=split.segmented)
    if by_file is not None:
        out.y_files, out.predicted_files[name] = by_file
    m.update(
        n_params=model.n_params(),
        train_seconds=model.train_seconds,
        inference_images_per_second=len(x_te) / max(infer_seconds, 1e-9),
        **extra,
    )
    calibration.merge(m, cal)
    if val is not None:  # the model as tested, on validation: an Optuna search's objective
        m["val_accuracy"] = float(np.mean(val[0].argmax(1) == val[1]))
    out.results[name] = m
    out.predicted[name] = scores.argmax(1)
    log.info("%s: test accuracy %.4f, macro-F1 %.4f", name, m["accuracy"], m["macro_f1"])
    if job.rank == 0:
        save_model(cfg, job, split, name, model, scores)
        if (explained := explain_model(cfg, job, split, name, model, scores)) is not None:
            out.explained[name] = explained


def explain_settings(cfg: DictConfig) -> explain.ExplainSettings:
    """The ``explain`` node as :class:`~pipeline.explain.ExplainSettings` (validated)."""
    node = cfg.get("explain")
    with config_keys("explain."):
        return explain.settings_from(OmegaConf.to_container(node) if node is not None else None)


def explain_model(cfg: DictConfig, job: Job, split: Split, name: str, model, scores) -> dict | None:
    """Model ``name``'s Grad-CAM maps, occlusion check and gallery of mistakes on the test
    split (:mod:`pipeline.explain`), its figures in the run folder; None when off."""
    settings = explain_settings(cfg)
    if not settings.enabled:
        return None
    x_te, y_te = split.inputs(model.input)["test"]
    test = explain.TestSet(
        inputs=x_te,
        y=y_te.numpy(),
        predicted=scores.argmax(1),
        images=ImageView(split.data.extracted.images, np.flatnonzero(split.masks["test"])),
        paths=split.test_paths,
        starts=split.test_starts,
        classes=split.data.classes,
        meta={"dataset": split.summary, "features": split.frontend.params.to_dict()},
    )
    return explain.explain_model(
        model,
        test,
        name=name,
        settings=settings,
        device=job.device,
        fig_dir=job.run_dir / "figures",
        amp=job.recipe(name).amp,
        seed=cfg.seed,
    )


def calibrated(job: Job, name: str, model, scores, y, x, **kwargs) -> calibration.Calibrated:
    """Model ``name``'s temperature fitted and its test figures computed (its own
    probabilities of the test inputs ``x`` where they are not a softmax of its scores)."""
    amp = job.recipe(name).amp
    probs = None if model.softmax_scores else model.probabilities(x, device=job.device, amp=amp)
    return calibration.calibrate_model(model, scores, y, probs=probs, **kwargs)


def save_model(cfg: DictConfig, job: Job, split: Split, name: str, model, scores) -> None:
    """Model ``name``'s bundle and its test predictions, in the run folder."""
    save_bundle(
        job.run_dir / "models" / name,
        model,
        classes=split.data.classes,
        frontend=split.frontend,
        data=split.data_settings,
        extra={
            "name": name,
            "seed": cfg.seed,
            "amp": job.recipe(name).amp,
            **calibration.bundle_meta(model),
        },
    )
    _write_predictions(
        job.run_dir / "predictions" / f"{name}.csv",
        split.test_paths,
        split.test_starts,
        split.tensors["test"][1].numpy(),
        scores,
        split.data.classes,
    )


def evaluate_adapted(
    cfg: DictConfig, job: Job, split: Split, name: str, model, out: Outcome
) -> dict:
    """AdaBN: each test group also classified with batch-norm statistics of its own images,
    beside the plain figures; returns the adapted figures for metrics.json."""
    x_te, y_te = split.inputs(model.input)["test"]
    classes = split.data.classes
    t0 = time.perf_counter()
    scores = adapted_logits(
        model.fitted,
        x_te,
        split.test_groups,
        batch_size=model.batch_size,
        device=job.device,
        amp=job.recipe(name).amp,
        seed=cfg.seed,
        key="evaluate.adapt_bn",
        regex_key="data.group_regex",
    ).numpy()
    scores /= model.temperature  # calibrated as the plain scores
    am, by_file = _evaluate(scores, y_te.numpy(), split.test_record, classes, files=split.segmented)
    extra = {f"adapted_{k}": am[k] for k in ADAPTED if k in am}
    extra.update(adapt_bn=job.adapt_bn, adapt_seconds=time.perf_counter() - t0)
    out.adapted[name] = by_file[1] if by_file is not None else scores.argmax(1)
    if job.rank == 0:
        _write_predictions(
            job.run_dir / "predictions" / f"{name}_adapted.csv",
            split.test_paths,
            split.test_starts,
            y_te.numpy(),
            scores,
            classes,
        )
    return extra


def assemble_metrics(cfg: DictConfig, job: Job, split: Split, out: Outcome) -> dict:
    """The contents of metrics.json, with McNemar's tests between the models."""
    # Windows of one file are not independent: where files were cut into windows, the test
    # compares the models' file-level predictions. Adapted networks are tested as models too.
    segmented = split.segmented
    plain = out.predicted_files if segmented else out.predicted
    significance = pairwise_mcnemar(
        out.y_files if segmented else split.tensors["test"][1].numpy(),
        {**plain, **{f"{n} adapted": a for n, a in out.adapted.items()}},
        unit="files" if segmented else "images",
    )
    data = split.data
    return {
        "models": out.results,
        "dataset": split.summary,
        "features": {
            **data.frontend.params.to_dict(),
            "auto": auto_keys(cfg),
            "normalize": cfg.features.normalize,
            "image_shape": list(split.images.shape[1:]),
            "seconds": data.seconds,
            "cache_key": data.cache_key,
            "cache_hit": data.cache_hit,
        },
        "histories": out.histories,
        "significance": significance,
        "adaptation": adaptation_summary(split.decision, job.adapt_bn, out.results, significance),
        "explain": explain.section(out.explained, settings=explain_settings(cfg)),
        "run": {
            "seed": cfg.seed,
            "device": str(job.device),
            "precision": precision(job.device, job.settings.amp),
            "command": _command(),
            "versions": package_versions(),
            "git_commit": report.git_commit(),
            "config": OmegaConf.to_container(cfg, resolve=True),
        },
    }


def write_outputs(run_dir: Path, metrics: dict, split: Split) -> None:
    """metrics.json, the figures and the reports; the table and the report's path printed."""
    ex = split.data.extracted
    atomic.write_json(run_dir / "metrics.json", metrics)
    examples = _examples(ex.images, split.y, split.masks["train"], len(split.data.classes))
    report.write_figures(run_dir, metrics, examples=examples)
    report_path = report.write_report(run_dir, metrics)
    print(report.summary_table(metrics))
    if ex.skipped:
        print(
            f"skipped {len(ex.skipped)} unreadable or unusable file(s): {run_dir / 'skipped.csv'}"
        )
    print(f"report: {report_path} and {report_path.with_suffix('.html')}")


def adaptation(
    cfg: DictConfig, data: Prepared, masks: dict[str, np.ndarray], test_groups: np.ndarray
) -> Decision:
    """``evaluate.adapt_bn`` decided for this run's split, logged in one sentence."""
    mode = cfg.get("evaluate", {}).get("adapt_bn", ADAPT_AUTO)
    records, ex = data.records, data.extracted
    train = sorted(set(ex.record[masks["train"]].tolist()))
    test = sorted(set(ex.record[masks["test"]].tolist()))
    decision = decide(
        mode,
        train_groups={records[i].group or "" for i in train},
        test_groups=set(test_groups.tolist()),
        grouped=any(r.group for r in records),
        split=data.strategy,
        test_regex=cfg.data.get("test_regex"),
        names={
            "train": [records[i].path.name for i in train],
            "test": [records[i].path.name for i in test],
        },
    )
    what = (
        "the networks are also evaluated adapted to each test group (AdaBN)"
        if decision.apply
        else "no test-time adaptation"
    )
    log.info("evaluate.adapt_bn=%s: %s: %s", mode, what, decision.why)
    if decision.suggestion:
        log.info("evaluate.adapt_bn: %s", decision.suggestion)
    return decision


def adaptation_summary(
    decision: Decision, mode, results: dict[str, dict], significance: list[dict]
) -> dict:
    """What ``metrics.json`` keeps of the adaptation: the decision, and per adapted network
    its plain and adapted accuracy with the McNemar test between them."""
    effects = {}
    for pair in significance:
        name = pair["a"]
        if pair["b"] == f"{name} adapted":
            m = results[name]
            key = "file_accuracy" if pair["unit"] == "files" else "accuracy"
            effects[name] = {
                "unit": pair["unit"],
                "plain": m[key],
                "adapted": m[f"adapted_{key}"],
                "p_holm": pair["p_holm"],
            }
    return {
        "mode": mode,
        "applied": decision.apply,
        "why": decision.why,
        "unseen_groups": list(decision.unseen),
        "suggestion": decision.suggestion,
        "effects": effects,
    }


def _evaluate(
    scores: np.ndarray, y: np.ndarray, record: np.ndarray, classes: list[str], *, files: bool
) -> tuple[dict, tuple[np.ndarray, np.ndarray] | None]:
    """Test metrics of window scores and, where files were cut into windows (``files``),
    the file accuracy in them and each file's true class and prediction."""
    m = classification_metrics(y, scores.argmax(1), classes)
    if not files:
        return m, None
    y_files, pred_files = file_level_predictions(scores, y, record)
    m["file_accuracy"] = float(np.mean(y_files == pred_files))
    return m, (y_files, pred_files)


def _command() -> str:
    """The command line that repeats this run; in a sweep, this job's own overrides."""
    args = sys.argv[1:]
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        args = list(HydraConfig.get().overrides.task)
    return "python -m pipeline.run " + " ".join(_quote(a) for a in args)


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


def _write_skipped(path: Path, skipped) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "reason"])
    writer.writerows([str(s.path), s.reason] for s in skipped)
    atomic.write_text(path, buf.getvalue())


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
