"""Read the recordings of a dataset file by file and cut them into windows.

Reading streams: :func:`iter_windows` yields one file's windows at a time, so
no more than one raw signal is held at once. A file that cannot be used is
skipped with its reason, never a crash of the run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from pipeline.data.records import Record
from pipeline.data.segments import segment
from pipeline.errors import ConfigError, SignalError
from pipeline.signals import AUDIO_SUFFIXES, read_signal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """A file left out of the run, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class FileWindows:
    """The windows of one file.

    Attributes:
        index: the file's index in the record list.
        path: the file.
        x: float32 array (windows, channels, length).
        start: (windows,) start of each window in samples.
        split: (windows,) split name of each window.
        n_samples: length of the file at the working rate.
        source_rate: the file's own sample rate.
    """

    index: int
    path: Path
    x: np.ndarray
    start: np.ndarray
    split: np.ndarray
    n_samples: int
    source_rate: int


@dataclass(frozen=True)
class Segmenting:
    """How files become windows, in samples at the working rate.

    Attributes:
        length: window length.
        hop: distance between window starts.
        pad: zero-pad short signals and a long-enough tail.
    """

    length: int
    hop: int
    pad: bool


def segmenting(
    *,
    sample_rate: int,
    length_seconds: float | None,
    hop_seconds: float | None,
    pad: bool,
    whole_length: int | None = None,
) -> Segmenting:
    """Turn the ``data.segment`` settings into samples.

    Args:
        length_seconds: window length (with ``sample_rate=1``, in samples); None
            for whole files, which then need ``whole_length``.
        hop_seconds: distance between windows; None for no overlap.
        whole_length: the length whole files are padded to (the longest file).
    """
    if length_seconds is None:
        assert whole_length is not None
        return Segmenting(whole_length, whole_length, True)
    if not length_seconds > 0:
        raise ConfigError(f"data.segment.length_seconds={length_seconds} must be positive or null")
    if hop_seconds is not None and not hop_seconds > 0:
        raise ConfigError(f"data.segment.hop_seconds={hop_seconds} must be positive or null")
    length = max(1, round(length_seconds * sample_rate))
    hop = max(1, round((hop_seconds or length_seconds) * sample_rate))
    return Segmenting(length, hop, pad)


def probe_length(path: Path, *, sample_rate: int, read: dict) -> int | None:
    """Length of a file at the working rate, from its header where possible; None if unreadable."""
    try:
        if path.suffix.lower() in AUDIO_SUFFIXES:
            info = sf.info(os.fsencode(path))
            return int(round(info.frames * sample_rate / info.samplerate))
        if path.suffix.lower() == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            axis = read.get("channel_axis", "auto")
            if len(shape) == 2 and axis != "auto":  # the axis that is not the channels'
                return int(shape[1] if axis == "first" else shape[0])
            return int(max(shape)) if shape else None
        return read_signal(path, sample_rate=sample_rate, **read).samples.shape[-1]
    except Exception:  # any damage: None here, and the reading pass skips it with the reason
        return None


def time_regions(
    n: int, *, length: int, val_fraction: float, test_fraction: float
) -> dict[str, tuple[int, int]]:
    """Contiguous [start, stop) sample ranges of one long recording: train, then val, then test.

    The last ``test_fraction`` of the samples is the test region, the
    ``val_fraction`` before it the validation region; a gap of one window
    separates neighbouring regions, so no window and no sample is in two splits
    and the windows next to a boundary are not neighbours in time.
    """
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    test = (n - n_test, n)
    val = (test[0] - length - n_val, test[0] - length) if n_val else (test[0], test[0])
    train_stop = (val[0] if n_val else test[0]) - length
    return {"train": (0, max(0, train_stop)), "val": val, "test": test}


def iter_windows(
    records: Sequence[Record],
    splits: Sequence[str],
    *,
    sample_rate: int,
    read: dict,
    seg: Segmenting,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    progress: bool = True,
) -> Iterator[FileWindows | Skipped]:
    """Yield each file's windows (or why it was skipped), one file at a time.

    Args:
        records: the files.
        splits: each record's split; ``"time"`` splits the file's own samples
            with :func:`time_regions`.
        sample_rate: working rate.
        read: keyword arguments of :func:`pipeline.signals.read_signal`
            (channels, mat_key, npz_key, csv_columns).
        seg: window length, hop and padding in samples.
        val_fraction: share of each recording for validation under the time split.
        test_fraction: share of each recording for testing under the time split.
        progress: show a progress bar.
    """
    n_channels = None
    for i, rec in enumerate(tqdm(records, desc="read", unit="file", disable=not progress)):
        try:
            sig = read_signal(rec.path, sample_rate=sample_rate, **read)
        except SignalError as err:
            log.warning("skipped %s", err)
            yield Skipped(rec.path, str(err))
            continue
        samples = sig.samples
        if n_channels is None:
            n_channels = samples.shape[0]
        elif samples.shape[0] != n_channels:
            reason = (
                f"{rec.path}: has {samples.shape[0]} channel(s), the files before it "
                f"{n_channels}; set data.channels=mix or pick channels every file has"
            )
            log.warning("skipped %s", reason)
            yield Skipped(rec.path, reason)
            continue
        if splits[i] == "time":
            regions = time_regions(
                samples.shape[-1], length=seg.length,
                val_fraction=val_fraction, test_fraction=test_fraction,
            )  # fmt: skip
        else:
            regions = {splits[i]: (0, samples.shape[-1])}
        xs, starts, names = [], [], []
        for name, (a, b) in regions.items():
            if b - a <= 0:
                continue
            w = segment(samples[:, a:b], length=seg.length, hop=seg.hop, pad=seg.pad)
            xs.append(w)
            starts.append(a + np.arange(len(w)) * seg.hop)
            names.append(np.full(len(w), name))
        if not xs or sum(len(w) for w in xs) == 0:
            reason = (
                f"{rec.path}: {samples.shape[-1]} samples is shorter than one window of "
                f"{seg.length}; set data.segment.pad=true to zero-pad it, or shorten the window"
            )
            log.warning("skipped %s", reason)
            yield Skipped(rec.path, reason)
            continue
        yield FileWindows(
            index=i,
            path=rec.path,
            x=np.concatenate(xs),
            start=np.concatenate(starts),
            split=np.concatenate(names),
            n_samples=samples.shape[-1],
            source_rate=sig.source_rate,
        )
