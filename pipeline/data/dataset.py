"""Read the recordings of a dataset and cut them into windows.

A file that cannot be used is skipped and reported, never a crash of the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.data.records import Record
from pipeline.data.segments import segment
from pipeline.errors import DataError, SignalError
from pipeline.signals import read_signal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """A file left out of the run, and why."""

    path: Path
    reason: str


@dataclass
class Windows:
    """Fixed-length windows of many recordings.

    Attributes:
        x: float32 array (n, channels, length).
        record: (n,) index of each window's recording in the record list.
        start: (n,) start of each window in samples.
        length: window length in samples.
        hop: distance between window starts in samples.
        resampled: paths of files read at another rate and resampled.
        skipped: files left out, with the reason.
    """

    x: np.ndarray
    record: np.ndarray
    start: np.ndarray
    length: int
    hop: int = 0
    resampled: list[Path] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def load_windows(
    records: list[Record],
    *,
    sample_rate: int,
    channels: str | list[int],
    length_seconds: float | None,
    hop_seconds: float | None,
    pad: bool,
    progress: bool = True,
) -> Windows:
    """Read every record and cut it into windows.

    Args:
        records: the files to read.
        sample_rate: working rate; files at another rate are resampled.
        channels: see :func:`pipeline.signals.read_signal`.
        length_seconds: window length; None takes each file whole, zero-padded
            to the longest file.
        hop_seconds: distance between windows; None means ``length_seconds``
            (no overlap).
        pad: see :func:`pipeline.data.segments.segment`.
        progress: show a progress bar.

    Returns:
        The windows of all usable files, in record order.

    Raises:
        DataError: no file could be used.
    """
    signals: list[tuple[int, np.ndarray]] = []
    out = Windows(np.empty(0), np.empty(0), np.empty(0), length=0)
    for i, rec in enumerate(tqdm(records, desc="read", unit="file", disable=not progress)):
        try:
            sig = read_signal(rec.path, sample_rate=sample_rate, channels=channels)
        except SignalError as err:
            log.warning("skipped %s", err)
            out.skipped.append(Skipped(rec.path, str(err)))
            continue
        if sig.resampled:
            out.resampled.append(rec.path)
        signals.append((i, sig.samples))
    if not signals:
        raise DataError(f"none of the {len(records)} files could be read; see the messages above")
    n_channels = {s.shape[0] for _, s in signals}
    if len(n_channels) > 1:
        raise DataError(
            f"files have different channel counts {sorted(n_channels)}; set data.channels=mix "
            "or pick channels every file has, e.g. data.channels=[0]"
        )
    if length_seconds is None:
        length = max(s.shape[-1] for _, s in signals)
        hop = length
    else:
        length = max(1, round(length_seconds * sample_rate))
        hop = max(1, round((hop_seconds or length_seconds) * sample_rate))
    xs, rec_idx, starts = [], [], []
    for i, samples in signals:
        w = segment(samples, length=length, hop=hop, pad=pad)
        if len(w) == 0:
            reason = (
                f"{records[i].path}: {samples.shape[-1]} samples is shorter than one window of "
                f"{length}; set data.segment.pad=true to zero-pad it"
            )
            log.warning("skipped %s", reason)
            out.skipped.append(Skipped(records[i].path, reason))
            continue
        xs.append(w)
        rec_idx.append(np.full(len(w), i))
        starts.append(np.arange(len(w)) * hop)
    if not xs:
        raise DataError("no file is long enough for one window; lower data.segment.length_seconds")
    out.x = np.concatenate(xs)
    out.record = np.concatenate(rec_idx)
    out.start = np.concatenate(starts)
    out.length = length
    out.hop = hop
    return out
