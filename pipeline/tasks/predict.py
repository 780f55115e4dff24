"""Batch classification of a folder of signal files with a saved model bundle.

Everything the model was trained with (rate, channels, windows, STFT settings,
normalisation) comes from the bundle, never from the current config. Files are
read one at a time and their windows classified in batches, so memory stays
bounded whatever the number of files; the output CSVs are written to temporary
files and renamed when complete. A bundle trained with ``features.per_group=freq``
needs each group's mean frequency profile first, and ``predict.adapt_bn=group``
re-estimates a network's batch-norm statistics on each group's own images (AdaBN),
which adapts it to a recording condition it never saw, without labels: for either or
both, a first pass over the files gathers each group's images (groups by
``predict.group_regex``), the second classifies.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from pipeline import atomic
from pipeline.adapt import (
    ADAPT_BN,
    ADAPT_WINDOWS,
    batchnorm_state,
    group_states,
    use_batchnorm,
)
from pipeline.blocks import Assembler, Part, read_blocks, streamed
from pipeline.bundle import Bundle, load_bundle
from pipeline.calibration import bundle_temperature
from pipeline.data.dataset import read_ahead
from pipeline.data.records import compile_regex
from pipeline.errors import ConfigError, DataError, SignalError
from pipeline.features.stft import STFTImage, finite_images, overflow_reason
from pipeline.frontend import Frontend, batches
from pipeline.models.base import wrap
from pipeline.runtime import precision, reading_workers, resolve_device
from pipeline.signals import SUFFIXES
from pipeline.timeline import Timeline, timeline_paths, timeline_settings
from pipeline.values import is_number, is_whole

log = logging.getLogger(__name__)

AGGREGATES = ("mean", "vote", "max")
CPU = torch.device("cpu")  # where predict_folder runs without a device given


def iter_files(root: Path) -> Iterator[Path]:
    """Supported files under ``root`` (or ``root`` itself), streamed without listing them all.

    Directory entries come in the file system's order, so a folder of any size
    is walked in constant memory.
    """
    if root.is_file():
        yield root
        return
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif Path(entry.name).suffix.lower() in SUFFIXES:
                    yield Path(entry.path)


class Classifier:
    """A bundle's front end and model: windows (n, channels, samples) -> probabilities."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: torch.device,
        amp: bool = True,
        hop_seconds: float | None = None,
    ) -> None:
        self.bundle = bundle
        self.device = device
        self.amp = amp  # mixed precision where it pays (pipeline.runtime.amp_dtype)
        self.frontend = with_hop(Frontend.from_bundle(bundle), hop_seconds)
        self.stft = STFTImage(self.frontend.params).to(device)
        self.classifier = wrap(bundle.model).to(device)
        # softmax(scores / T) with the temperature fitted in training (absent in older bundles)
        self.classifier.temperature = bundle_temperature(bundle.meta, file="bundle.json")
        self.model = self.classifier.fitted  # a network's module, for batch-norm adaptation
        self.in_channels = self.classifier.in_channels

    @torch.no_grad()
    def images(self, windows: np.ndarray) -> torch.Tensor:
        """The model's input for windows (n, channels, samples), on the device, as in
        training: normalised images (:meth:`Frontend.raw_images`), or for a raw-input
        model (the 1-D ResNet) the standardised windows."""
        kind = self.classifier.input
        return self.frontend.inputs(windows, kind, device=self.device, module=self.stft)

    @torch.no_grad()
    def usable(self, windows: np.ndarray, inputs: torch.Tensor) -> np.ndarray:
        """(n,) bool: the windows training would have kept: finite inputs, and for a
        raw-input model a finite STFT image too (training skips a file whose image is not,
        whatever the models, so predict refuses the same files with the same words)."""
        ok = finite_images(inputs)
        if self.classifier.input == "raw":
            raw = self.frontend.raw_images(
                windows, device=self.device, batch_size=max(1, len(windows)), module=self.stft
            )
            ok &= finite_images(raw)
        return ok

    @torch.no_grad()
    def __call__(self, windows: np.ndarray, profiles: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities (n, classes); ``profiles`` (n, channels, height, 1), when
        given, are the windows' group profiles (``features.per_group``), subtracted.
        A window whose image is not finite (:func:`finite_images`) gets a row of NaN."""
        # Images stay on the device from the STFT to the softmax (one copy each way).
        images = self.images(windows)
        if profiles is not None:
            images = images - torch.from_numpy(profiles).to(self.device)
        ok = self.usable(windows, images)
        if not ok.all():
            images = torch.where(torch.isfinite(images), images, 0.0)
        probs = self.classifier.probabilities(images, device=self.device, amp=self.amp)
        probs[~ok] = np.nan
        return probs


@dataclass
class _File:
    path: Path
    true: str | None
    n: int  # windows
    starts: np.ndarray
    group: str = ""
    first: int = 0  # a long file read in blocks (pipeline.blocks): its first window's index
    last: bool = True  # and whether its windows end the file


def with_hop(frontend: Frontend, hop_seconds: float | None) -> Frontend:
    """``frontend`` with windows ``hop_seconds`` apart (None: the bundle's own hop); the
    window length, and so what the model sees, stays the bundle's."""
    if hop_seconds is None:
        return frontend
    hop = max(1, round(hop_seconds * frontend.sample_rate))
    log.info(
        "windows every %d samples (predict.hop_seconds=%s; the bundle's hop: %d)",
        hop,
        hop_seconds,
        frontend.segmenting.hop,
    )
    return replace(frontend, segmenting=replace(frontend.segmenting, hop=hop))


def check_amp(amp) -> None:
    """``predict.amp`` is null, true or false."""
    if amp is not None and not isinstance(amp, bool):
        raise ConfigError(
            f"predict.amp={amp!r} must be null (as the model was trained and evaluated), true "
            "(mixed precision on CUDA and on CPUs with native bf16) or false (float32)"
        )


def bundle_amp(amp: bool | None, bundle: Bundle) -> bool:
    """``predict.amp``, or where it is null the bundle's ``train.amp`` (true, the training
    default, for a bundle saved outside a training run, which records none)."""
    return bool(bundle.meta.get("amp", True)) if amp is None else amp


@dataclass(frozen=True)
class WindowReader:
    """Reads one file through a bundle's front end into the model's windows (n, channels,
    samples), or the reason as a string when the file cannot be classified; a plain
    object, so worker processes can run it."""

    frontend: Frontend
    channels: int
    block: int = 0  # an audio file of more windows is read this many at a time; 0: whole

    def __call__(self, path: Path) -> np.ndarray | str:
        try:
            return self.frontend.windows(path, channels=self.channels).x
        except SignalError as err:
            return str(err)

    def streams(self, path: Path) -> bool:
        """Whether ``path`` is a long audio file, read in blocks (:mod:`pipeline.blocks`)."""
        return bool(self.block) and streamed(path, self.frontend, block=self.block)

    def items(self, path: Path) -> Iterator[np.ndarray | Part | str]:
        """The file's windows at once, or a long audio file's in :class:`Part` s."""
        if self.streams(path):
            yield from read_blocks(path, self.frontend, channels=self.channels, block=self.block)
        else:
            yield self(path)

    def ahead(self, path: Path) -> tuple[Path, np.ndarray | str | None]:
        """``(path, windows or reason)`` for a reading process; None for a long file, which
        the main process reads in blocks (:func:`read_files`)."""
        return path, None if self.streams(path) else self(path)


class _Listing:
    """The files under ``source``, as 1-tuples, listed afresh by each reading process."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def __iter__(self) -> Iterator[tuple[Path]]:
        return ((path,) for path in iter_files(self.source))


def read_files(
    source: Path, reader: WindowReader, *, workers: int, chunk: int = 32
) -> Iterator[tuple[Path, np.ndarray | str]]:
    """The files under ``source`` with their windows, in order; ``workers`` processes read ahead.

    Each worker keeps at most a few files ready, so memory stays bounded
    whatever the number of files; a long audio file (:meth:`WindowReader.streams`) is read
    in blocks by this process, in its place.
    """
    if workers == 0:
        return ((path, item) for path in iter_files(source) for item in reader.items(path))
    ahead = read_ahead(_Listing(source), reader.ahead, workers=workers, chunk=chunk, prefetch=4)
    return (
        (path, part)
        for path, item in ahead
        for part in (reader.items(path) if item is None else [item])
    )


def file_group(path: Path, pattern: re.Pattern | None) -> str:
    """The first capture group of ``pattern`` in the file name; "" (one shared group) when
    there is no pattern or it does not match."""
    match = pattern.search(path.name) if pattern is not None else None
    return (match.group(1) or "") if match else ""  # an optional group may match nothing


def _ungrouped(pattern: re.Pattern | None) -> str:
    """Why files fall into the shared group "", for the warnings of the grouping passes."""
    return f"match no group_regex ({pattern.pattern!r})" if pattern else "have no group_regex"


@dataclass
class GroupImages:
    """What one pass over the input gathers per group (a speaker, a microphone)."""

    keep: int  # the most images kept per group
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # (channels, height) float64
    windows: dict[str, int] = field(default_factory=dict)  # windows seen
    files: dict[str, int] = field(default_factory=dict)  # readable files
    kept: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # sampled images, CPU


def group_pass(
    classify: Classifier,
    files: Iterator[tuple[Path, np.ndarray | str]],
    pattern: re.Pattern | None,
    *,
    keep: int,
    progress: bool,
) -> GroupImages:
    """One read of the input for the steps that need each group before classifying it:
    the sums behind each group's mean frequency profile (``features.per_group``) and, with
    ``keep`` > 0, a seeded reservoir sample of at most ``keep`` images per group for
    :func:`adapt_batchnorm`, so memory stays bounded. Unreadable files are left out here;
    the classifying pass reports them."""
    rng = np.random.default_rng(0)
    out = GroupImages(keep=keep)
    for path, item in tqdm(files, desc="groups", unit="file", disable=not progress):
        windows = item.x if isinstance(item, Part) else item
        if isinstance(windows, str) or not len(windows):
            continue
        g = file_group(path, pattern)
        images = classify.images(windows)  # (n, channels, height, width), or raw windows
        if not classify.usable(windows, images).all():
            continue  # the classifying pass reports it (overflow_reason)
        # float64 on the CPU (MPS has no float64): (channels, height)
        if images.dim() == 4:  # images: their frequency profile (raw windows have none)
            out.sums[g] = out.sums.get(g, 0) + images.mean(dim=3).sum(dim=0).cpu().double()
        out.files[g] = out.files.get(g, 0) + (not isinstance(item, Part) or item.first == 0)
        n = out.windows.get(g, 0)
        out.windows[g] = n + len(windows)
        if keep:
            reservoir = out.kept.setdefault(g, [])
            for t, image in enumerate(images.cpu(), start=n):  # t windows of g before it
                if t < keep:
                    reservoir.append(image)
                elif (j := int(rng.integers(t + 1))) < keep:
                    reservoir[j] = image
    return out


def group_profiles(seen: GroupImages, pattern: re.Pattern | None) -> dict[str, np.ndarray]:
    """Each group's mean frequency profile (channels, height, 1) over its windows and time,
    as :func:`pipeline.features.stft.group_profiles` computes it in training."""
    if "" in seen.files:
        log.warning(
            "features.per_group: %d file(s) %s and form one group; its mean profile is removed "
            "from each of them, which is right only if they share a microphone or speaker and "
            "hold a mix of classes",
            seen.files[""],
            _ungrouped(pattern),
        )
    return {
        g: (seen.sums[g] / seen.windows[g]).numpy()[..., None].astype(np.float32)
        for g in sorted(seen.sums)
    }


def adapt_batchnorm(
    classify: Classifier,
    seen: GroupImages,
    pattern: re.Pattern | None,
    *,
    profiles: dict[str, np.ndarray] | None,
    batch_size: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """Each group's batch-norm statistics, re-estimated on its own images (AdaBN): those
    :func:`group_pass` kept, less the group's profile for a bundle with
    ``features.per_group``, through :func:`pipeline.adapt.group_states`."""
    samples = {g: torch.stack(kept) for g, kept in seen.kept.items()}
    if profiles is not None:
        samples = {g: images - torch.from_numpy(profiles[g]) for g, images in samples.items()}
    states = group_states(
        classify.model,
        samples,
        batch_size=batch_size,
        device=classify.device,
        amp=classify.amp,
        key="predict.adapt_bn",
        regex_key="predict.group_regex",
    )
    if "" in seen.files:
        log.warning(
            "predict.adapt_bn: %d file(s) %s and form one group, whose batch-norm statistics "
            "are re-estimated together",
            seen.files[""],
            _ungrouped(pattern),
        )
    sampled = [g for g in seen.kept if seen.windows[g] > seen.keep]
    if sampled:
        log.info(
            "predict.adapt_bn: %d group(s) have more than %d windows; a random %d of each "
            "gave its statistics",
            len(sampled),
            seen.keep,
            seen.keep,
        )
    return states


def aggregate(probs: np.ndarray, rule: str) -> np.ndarray:
    """File scores (n_classes,) from its windows' probabilities (windows, n_classes)."""
    if rule == "mean":
        return probs.mean(axis=0)
    if rule == "max":
        scores = probs.max(axis=0)
        return scores / scores.sum()
    votes = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
    return votes / votes.sum()


def run(cfg: DictConfig, *, run_dir: Path) -> dict:
    """Classify ``predict.input`` and write the CSVs; returns a summary."""
    p = cfg.predict
    workers = check_settings(cfg)
    source = Path(p.input)
    if not source.exists():
        raise ConfigError(f"predict.input={str(source)!r} does not exist; give a folder or a file")
    outputs = output_paths(p, run_dir)
    bundle = load_bundle(p.model)
    device = resolve_device(cfg.device)
    amp = bundle_amp(p.get("amp"), bundle)
    adapts = wrap(bundle.model).adapts  # a network, with batch norms
    if adapts:
        log.info("device %s (%s)", device, precision(device, amp))
    adapt_bn = bool(p.get("adapt_bn", False))
    if adapt_bn and not adapts:
        log.warning(
            "predict.adapt_bn=group is not used: %s is a %s bundle, without batch norm",
            p.model,
            bundle.kind,
        )
        adapt_bn = False
    pattern = grouping(p, bundle, adapt_bn=adapt_bn)
    timeline = make_timeline(p, bundle, outputs[0])
    summary = predict_folder(
        bundle,
        source,
        outputs=outputs,
        device=device,
        batch_size=p.batch_size,
        top_k=min(p.top_k, len(bundle.classes)),
        rule=p.aggregate,
        progress=cfg.progress,
        workers=workers,
        group_pattern=pattern,
        adapt_bn=adapt_bn,
        amp=amp,
        timeline=timeline,
        hop_seconds=p.get("hop_seconds"),
    )
    if adapts and not adapt_bn:
        advise_adaptation(bundle, source, pattern or _group_pattern(p.get("group_regex"), bundle))
    print_summary(summary, outputs)
    if timeline is not None:
        print(f"timelines: {timeline.html_path} ({timeline.timelines} file(s))")
    if summary["classified"] == 0:
        raise DataError(f"no file under predict.input={str(source)!r} could be classified")
    return summary


def check_settings(cfg: DictConfig) -> int:
    """The ``predict`` settings that need no bundle, checked; returns the reading workers.

    Raises:
        ConfigError: naming the first bad setting.
    """
    p = cfg.predict
    if p.aggregate not in AGGREGATES:
        raise ConfigError(f"predict.aggregate={p.aggregate!r} must be one of {list(AGGREGATES)}")
    workers = reading_workers(p.workers, key="predict.workers")
    for key in ("top_k", "batch_size"):
        if not is_whole(p[key], minimum=1):
            raise ConfigError(f"predict.{key}={p[key]!r} must be a positive integer")
    for key in ("segments", "overwrite"):
        if not isinstance(p[key], bool):
            raise ConfigError(f"predict.{key}={p[key]!r} must be true or false")
    if not isinstance(cfg.progress, bool):
        raise ConfigError(f"progress={cfg.progress!r} must be true or false")
    if p.get("adapt_bn", False) not in ADAPT_BN:
        raise ConfigError(
            f"predict.adapt_bn={p.adapt_bn!r} must be false or group (re-estimate a network's "
            "batch-norm statistics on each group's own files)"
        )
    check_amp(p.get("amp"))
    hop = p.get("hop_seconds")
    if hop is not None and not (is_number(hop) and hop > 0):
        raise ConfigError(
            f"predict.hop_seconds={hop!r} must be a positive number of seconds between window "
            "starts (e.g. 0.1 for a finer timeline), or null for the bundle's own hop"
        )
    timeline_config(p)
    return workers


def timeline_config(p: DictConfig):
    """``predict.timeline*`` checked (:func:`pipeline.timeline.timeline_settings`)."""
    return timeline_settings(
        timeline=p.get("timeline", "auto"),
        min_windows=p.get("timeline_min_windows", 60),
        max_files=p.get("timeline_files", 20),
        smooth=p.get("timeline_smooth", 3),
    )


def make_timeline(p: DictConfig, bundle: Bundle, output: Path) -> Timeline | None:
    """The timeline outputs beside predict's CSV ``output`` (None: predict.timeline=false)."""
    settings = timeline_config(p)
    if settings is None:
        return None
    return Timeline(
        settings,
        classes=bundle.classes,
        window_seconds=bundle.data["segment_samples"] / bundle.data["sample_rate"],
        paths=timeline_paths(output),
        about={"model": str(p.model), "input": str(p.input)},
    )


def output_paths(p: DictConfig, run_dir: Path) -> list[Path]:
    """The files, errors and (``predict.segments``) segments CSVs, checked writable.

    Raises:
        ConfigError: one is a folder, or exists and ``predict.overwrite`` is false.
    """
    output = Path(p.output) if p.output else run_dir / "predictions.csv"
    outputs = [output, output.with_name(output.stem + "_errors.csv")]
    if p.segments:
        outputs.append(output.with_name(output.stem + "_segments.csv"))
    timeline = [] if p.get("timeline", "auto") is False else timeline_paths(output)
    folders = [str(o) for o in outputs + timeline if o.is_dir()]
    if folders:
        raise ConfigError(
            f"predict.output={str(output)!r}: {folders[0]} is a folder, so the CSV cannot "
            "replace it; give a file name, e.g. predict.output=<folder>/predictions.csv"
        )
    existing = [str(o) for o in outputs + timeline if o.exists()]
    if existing and not p.overwrite:
        raise ConfigError(
            f"predict.output={str(output)!r}: {existing} exist already; choose another "
            "predict.output or set predict.overwrite=true"
        )
    return outputs


def grouping(p: DictConfig, bundle: Bundle, *, adapt_bn: bool) -> re.Pattern | None:
    """The pattern that groups the input's files, where the bundle's per-group profiles or
    the batch-norm adaptation need groups; None otherwise."""
    if bundle.normalizer.per_group or adapt_bn:
        return _group_pattern(p.get("group_regex"), bundle)
    if p.get("group_regex"):
        log.warning(
            "predict.group_regex=%r is not used: %s was trained without features.per_group "
            "and predict.adapt_bn is off",
            p.group_regex,
            p.model,
        )
    return None


def print_summary(summary: dict, outputs: list[Path]) -> None:
    """The run's counts, rate and accuracy, and where the CSVs are."""
    line = (
        f"classified {summary['classified']} file(s), {summary['errors']} error(s) "
        f"in {summary['seconds']:.1f} s ({summary['files_per_second']:.0f} files/s)"
    )
    if summary["scored"]:
        line += f"; accuracy {summary['accuracy']:.4f} on {summary['scored']} labelled file(s)"
    print(line)
    print(f"predictions: {outputs[0]}")
    if summary["errors"]:
        print(f"errors: {outputs[1]}")


def advise_adaptation(bundle: Bundle, source: Path, pattern: re.Pattern | None) -> None:
    """Log the advice to adapt when no group of the input occurred in training."""
    trained = set(bundle.data.get("train_groups") or [])
    if pattern is None or not trained:
        return
    groups = {file_group(p, pattern) for p in iter_files(source)} - {""}
    if groups and groups.isdisjoint(trained):
        log.warning(
            "the input's groups (%s, by %r) never occurred in this model's training; "
            "predict.adapt_bn=group re-estimates its batch-norm statistics on each group's "
            "own files first, which often helps under such a shift (the training run's report "
            "gives the adapted figures where its test groups were unseen too)",
            ", ".join(sorted(groups)[:6]) + (" ..." if len(groups) > 6 else ""),
            pattern.pattern,
        )


def _group_pattern(configured: str | None, bundle: Bundle) -> re.Pattern | None:
    """``predict.group_regex``, else the training run's ``data.group_regex``, compiled."""
    if configured:
        return compile_regex("predict.group_regex", configured)
    return compile_regex("the bundle's data.group_regex", bundle.data.get("group_regex"))


def predict_folder(
    bundle: Bundle,
    source: Path,
    *,
    outputs: list[Path],
    device: torch.device | None = None,
    batch_size: int = 256,
    top_k: int = 1,
    rule: str = "mean",
    progress: bool = False,
    workers: int = 0,
    group_pattern: re.Pattern | None = None,
    adapt_bn: bool = False,
    amp: bool = True,
    timeline: Timeline | None = None,
    hop_seconds: float | None = None,
) -> dict:
    """Stream ``source`` through the classifier, writing file, error and segment rows.

    Files are read and cut into windows (``hop_seconds`` apart; None: the bundle's hop) by
    ``workers`` processes (0: in this one), a bounded number ahead of the classifier, and
    their rows written in the order they were found. For a bundle with
    ``features.per_group``, or with ``adapt_bn``, a first pass (:func:`group_pass`) reads
    every file once, grouped by ``group_pattern`` (files it does not match, or all of them
    without one, form one group); it gives each group's profile and the images that
    re-estimate a network's batch-norm statistics per group (:func:`adapt_batchnorm`).
    Each group's files are then classified with its own. An audio file of more than
    ``batch_size`` windows is read that many at a time (:mod:`pipeline.blocks`);
    ``timeline`` gets each file's window probabilities.

    Returns:
        Counts, accuracy on files whose class folder names a bundle class, timing.
    """
    classify = Classifier(bundle, device=device or CPU, amp=amp, hop_seconds=hop_seconds)
    start_time = time.perf_counter()
    reader = WindowReader(classify.frontend, classify.in_channels, block=batch_size)
    profiles, adapted = first_pass(
        classify,
        source,
        reader,
        group_pattern,
        adapt_bn=adapt_bn,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
    )
    trained = batchnorm_state(classify.model) if adapted is not None else None
    with PredictionWriter(
        outputs,
        classes=bundle.classes,
        top_k=top_k,
        rule=rule,
        rate=classify.frontend.sample_rate,
        timeline=timeline,
    ) as writer:
        loaded = tqdm(read_files(source, reader, workers=workers), **bar("predict", progress))
        files = classifiable(loaded, writer, classify, source, group_pattern, (profiles, adapted))
        for run in batches(files, batch_size, lambda item: item[0].n):
            writer.write(run, score(classify, run, profiles, adapted, trained))
    return run_summary(writer.counts, time.perf_counter() - start_time)


def bar(desc: str, progress: bool) -> dict:
    """tqdm's arguments for a bar of files, shown with ``progress``."""
    return {"desc": desc, "unit": "file", "disable": not progress}


def run_summary(counts: dict, seconds: float) -> dict:
    """predict_folder's summary: the writer's counts, the accuracy, the time and rate."""
    return {
        **counts,
        "accuracy": counts["correct"] / counts["scored"] if counts["scored"] else None,
        "seconds": seconds,
        "files_per_second": (counts["classified"] + counts["errors"]) / max(seconds, 1e-9),
    }


def classifiable(
    loaded: Iterator[tuple[Path, np.ndarray | str]],
    writer: PredictionWriter,
    classify: Classifier,
    source: Path,
    pattern: re.Pattern | None,
    passed: tuple[dict | None, dict | None],
) -> Iterator[tuple[_File, np.ndarray]]:
    """The files that can be classified, with their windows; the others go to the writer's
    errors: unreadable files, and files whose group the first pass (``passed``: profiles,
    adapted statistics) did not see."""
    root = source if source.is_dir() else source.parent
    classes, hop = classify.bundle.classes, classify.frontend.segmenting.hop
    for path, windows in loaded:
        if writer.refused(path):  # a later block of a long file already refused
            continue
        if isinstance(windows, str):
            writer.error(path, windows)
            continue
        group = file_group(path, pattern)
        if any(d is not None and group not in d for d in passed):
            # Listed or readable only since the first pass: the folder changed meanwhile.
            writer.error(
                path,
                f"{path}: its group {group!r} was not in the first pass: the input changed "
                "during the run; classify it again",
            )
            continue
        parts = path.relative_to(root).parts
        true = parts[0] if len(parts) > 1 and parts[0] in classes else None
        first, last = (windows.first, windows.last) if isinstance(windows, Part) else (0, True)
        windows = windows.x if isinstance(windows, Part) else windows
        starts = (first + np.arange(len(windows))) * hop
        yield _File(path, true, len(windows), starts, group, first, last), windows


def first_pass(
    classify: Classifier,
    source: Path,
    reader: WindowReader,
    pattern: re.Pattern | None,
    *,
    adapt_bn: bool,
    batch_size: int,
    workers: int,
    progress: bool,
) -> tuple[dict | None, dict | None]:
    """Each group's profile (a bundle with ``features.per_group``) and batch-norm statistics
    (``adapt_bn``), from one read of the input before the classifying one; Nones otherwise."""
    # a group's profile is of images: a raw-input model's windows have none to remove
    per_group = classify.bundle.normalizer.per_group and classify.classifier.input == "image"
    if not (per_group or adapt_bn):
        return None, None
    files = read_files(source, reader, workers=workers)
    seen = group_pass(
        classify, files, pattern, keep=ADAPT_WINDOWS if adapt_bn else 0, progress=progress
    )
    profiles = adapted = None
    if per_group:
        profiles = group_profiles(seen, pattern)
        log.info(
            "features.per_group: profiles of %d group(s) from the input: %s",
            len(profiles),
            ", ".join(repr(g) for g in profiles) or "none",
        )
    if adapt_bn:
        adapted = adapt_batchnorm(classify, seen, pattern, profiles=profiles, batch_size=batch_size)
        log.info(
            "predict.adapt_bn: batch-norm statistics of %d group(s) from the input: %s",
            len(adapted),
            ", ".join(repr(g) for g in adapted) or "none",
        )
    return profiles, adapted


def score(
    classify: Classifier,
    pending: list[tuple[_File, np.ndarray]],
    profiles: dict | None,
    adapted: dict | None,
    trained: dict | None,
) -> np.ndarray:
    """Probabilities (windows, classes) of the pending files' windows, each group's with its
    profile removed and its own batch-norm statistics where the first pass gave them
    (``trained``, the network's own, restored after)."""
    shift = None
    if profiles is not None:
        shift = np.concatenate(
            [
                np.broadcast_to(profiles[f.group], (f.n, *profiles[f.group].shape))
                for f, _ in pending
            ]
        )
    windows = np.concatenate([w for _, w in pending])
    if adapted is None:
        return classify(windows, shift)
    group_of = np.concatenate([[f.group] * f.n for f, _ in pending])
    probs = np.empty((len(windows), len(classify.bundle.classes)))
    try:
        for g in dict.fromkeys(group_of):
            rows = group_of == g
            use_batchnorm(classify.model, adapted[g])
            probs[rows] = classify(windows[rows], None if shift is None else shift[rows])
    finally:
        use_batchnorm(classify.model, trained)
    return probs


class PredictionWriter:
    """Owns predict's CSVs (files, errors, optional segments): written to temporary files,
    flushed to the device and renamed into place when the run completes; counts the rows.

    A file name's undecodable bytes (surrogates) are written escaped, so the CSVs stay UTF-8.
    """

    def __init__(
        self,
        outputs: list[Path],
        *,
        classes: list[str],
        top_k: int,
        rule: str,
        rate: int,
        timeline: Timeline | None = None,
    ) -> None:
        self.outputs, self.classes, self.top_k, self.rule, self.rate = (
            outputs,
            classes,
            top_k,
            rule,
            rate,
        )
        self.counts = {"classified": 0, "errors": 0, "scored": 0, "correct": 0}
        self._stack = ExitStack()
        self.timeline = timeline  # <stem>_timeline.csv and <stem>.html (pipeline.timeline)
        self._parts = Assembler()  # a long file's blocks, back together

    def __enter__(self) -> PredictionWriter:
        tmps = [self._stack.enter_context(atomic.atomic_path(o)) for o in self.outputs]
        self._handles = [
            self._stack.enter_context(
                open(t, "w", newline="", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115 (closed by the stack)
            )
            for t in tmps
        ]
        self._files, self._errors = (csv.writer(h) for h in self._handles[:2])
        self._segments = csv.writer(self._handles[2]) if len(self._handles) > 2 else None
        self._files.writerow(
            ["path", "predicted", "confidence", "n_segments", "true"]
            + [f"{k}_{i}" for i in range(1, self.top_k + 1) for k in ("label", "score")]
        )
        self._errors.writerow(["path", "reason"])
        if self.timeline is not None:
            self._stack.enter_context(self.timeline)
        if self._segments:
            self._segments.writerow(
                ["path", "segment", "start_seconds", "predicted", *self.classes]
            )
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            for h in self._handles:
                h.flush()
                os.fsync(h.fileno())
        self._stack.__exit__(*exc)

    def refused(self, path: Path) -> bool:
        """Whether ``path`` has its error row already (its later blocks are left out)."""
        return self._parts.skips(path)

    def error(self, path: Path, reason: str) -> None:
        self._errors.writerow([str(path), reason])
        self.counts["errors"] += 1
        self._parts.drop(path)
        if self.timeline is not None:
            self.timeline.error(path, reason)

    def write(self, pending: list[tuple[_File, np.ndarray]], probs: np.ndarray) -> None:
        """The rows of the pending files from their windows' probabilities (in order)."""
        at = 0
        for f, windows in pending:
            p = probs[at : at + f.n]
            at += f.n
            if self.refused(f.path):  # a block of a long file already refused
                continue
            if not np.isfinite(p).all():
                self.error(f.path, overflow_reason(f.path, windows))
                continue
            whole = self._parts.add(f, p)  # None until a long file's last block
            if whole is not None:
                self._write_file(*whole)

    def _write_file(self, f: _File, p: np.ndarray) -> None:
        classes = self.classes
        scores = aggregate(p, self.rule)
        order = np.argsort(-scores)[: self.top_k]
        predicted = classes[order[0]]
        self._files.writerow(
            [str(f.path), predicted, f"{scores[order[0]]:.6g}", f.n, f.true or ""]
            + [v for i in order for v in (classes[i], f"{scores[i]:.6g}")]
        )
        if self._segments:
            for j, (row, s) in enumerate(zip(p, f.starts, strict=True)):
                self._segments.writerow(
                    [
                        str(f.path),
                        j,
                        f"{s / self.rate:.6g}",
                        classes[int(row.argmax())],
                        *(f"{v:.6g}" for v in row),
                    ]
                )
        if self.timeline is not None:
            self.timeline.add(f.path, f.starts / self.rate, p, scores)
        self.counts["classified"] += 1
        if f.true is not None:
            self.counts["scored"] += 1
            self.counts["correct"] += predicted == f.true
