"""Read the recordings of a dataset file by file and cut them into windows.

Reading streams: :func:`iter_windows` yields one file's windows at a time, so
no more than one raw signal is held at once; each file goes through the run's
:class:`~pipeline.frontend.Frontend`, the path prediction uses too. A file that
cannot be used is skipped with its reason, never a crash of the run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import soundfile as sf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline.data.records import Record
from pipeline.errors import SignalError
from pipeline.frontend import Frontend, ShortSignal, Windows
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
    frontend: Frontend,
    *,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    progress: bool = True,
    workers: int = 0,
) -> Iterator[FileWindows | Skipped]:
    """Yield each file's windows (or why it was skipped), one file at a time, in order.

    Args:
        records: the files.
        splits: each record's split; ``"time"`` splits the file's own samples
            with :func:`time_regions`.
        frontend: reads and cuts each file (:meth:`Frontend.windows`).
        val_fraction: share of each recording for validation under the time split.
        test_fraction: share of each recording for testing under the time split.
        progress: show a progress bar.
        workers: processes reading files ahead (:func:`read_ahead`); 0 reads here.
    """
    reader = _FileReader(frontend, val_fraction=val_fraction, test_fraction=test_fraction)
    items = [(rec.path, split) for rec, split in zip(records, splits, strict=True)]
    read = read_ahead(items, reader, workers=workers)
    bar = tqdm(read, total=len(items), desc="read", unit="file", disable=not progress)
    channels = None  # the first usable file's, which every other file must have
    for i, (rec, w) in enumerate(zip(records, bar, strict=True)):
        if not isinstance(w, str) and channels is not None:
            try:
                frontend.check_channels(rec.path, w.x.shape[1], channels)
            except SignalError as err:
                w = str(err)
        if isinstance(w, str):
            log.warning("skipped %s", w)
            yield Skipped(rec.path, w)
            continue
        channels = w.x.shape[1]
        yield FileWindows(i, rec.path, w.x, w.start, w.split, w.n_samples, w.source_rate)


@dataclass(frozen=True)
class _FileReader:
    """One file's windows through the front end, or why it cannot be used (a string); a
    plain object, so worker processes can run it."""

    frontend: Frontend
    val_fraction: float = 0.0
    test_fraction: float = 0.0

    def __call__(self, path: Path, split: str) -> Windows | str:
        length = self.frontend.segmenting.length
        regions = (
            partial(
                time_regions,
                length=length,
                val_fraction=self.val_fraction,
                test_fraction=self.test_fraction,
            )
            if split == "time"
            else partial(_whole, name=split)
        )
        try:
            return self.frontend.windows(path, regions=regions)
        except SignalError as err:
            reason = str(err)
            if isinstance(err, ShortSignal):
                reason += "; set data.segment.pad=true to zero-pad it, or shorten the window"
            return reason


class _Ahead(IterableDataset):
    """Lists of ``read(*item)`` for runs of ``size`` items; worker k reads every n-th run.

    Each worker walks the whole of ``items`` (so it must be iterable again, a list or a
    listing that lists afresh) and reads only its own runs. A DataLoader takes one list from
    each worker in turn, so with this sharding the runs arrive in order. Runs rather than
    single items: each crossing from a worker costs about 0.1 ms.
    """

    def __init__(self, items: Iterable[tuple], read: Callable, size: int) -> None:
        self.items, self.read, self.size = items, read, size

    def __iter__(self) -> Iterator[list]:
        info = get_worker_info()
        n, k = (info.num_workers, info.id) if info is not None else (1, 0)
        run: list = []
        for i, item in enumerate(self.items):
            if (i // self.size) % n == k:
                run.append(self.read(*item))
                if len(run) == self.size:
                    yield run
                    run = []
        if run:
            yield run


def _as_is(item):
    return item


def read_ahead(
    items: Iterable[tuple], read: Callable, *, workers: int, chunk: int = 8, prefetch: int = 2
) -> Iterator:
    """``read(*item)`` for every item, in order; ``workers`` processes read ahead of the
    caller (each keeps at most ``prefetch`` runs of ``chunk`` ready), or none for 0."""
    if workers == 0:
        return (read(*item) for item in items)
    loader = DataLoader(
        _Ahead(items, read, chunk),
        batch_size=None,
        num_workers=workers,
        collate_fn=_as_is,
        prefetch_factor=prefetch,
    )
    return (got for run in loader for got in run)


def _whole(n: int, *, name: str) -> dict[str, tuple[int, int]]:
    """The whole file as one region of split ``name``."""
    return {name: (0, n)}
