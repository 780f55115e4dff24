"""Stream windows into STFT images, written batch by batch to disk (or held, without a sink).

With an :class:`~pipeline.features.store.ImageWriter` as ``sink``, each batch's images go
straight to the file, so no more than a batch of images (and of windows) is ever held,
whatever the dataset's size; without one, the images of the whole dataset are held.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.data.dataset import FileWindows, Skipped
from pipeline.errors import DataError
from pipeline.features.stft import STFTImage, finite_images, overflow_reason
from pipeline.features.store import ImageFile, ImageWriter
from pipeline.frontend import Frontend, batches

log = logging.getLogger(__name__)


@dataclass
class Extracted:
    """Images of every window of the usable files.

    Attributes:
        images: (n, channels, height, width), before normalisation, every value finite: a
            float32 array, or an :class:`~pipeline.features.store.ImageFile` on disk
            (indexing it gives float32 arrays too).
        record: (n,) index of each window's file in the record list.
        start: (n,) start of each window in samples.
        split: (n,) split of each window.
        file_samples: (n_records,) length of each file in samples, -1 if skipped.
        file_rates: (n_records,) each file's own sample rate, -1 if skipped.
        skipped: the files left out, with reasons.
        windows: float32 (n, channels, samples), the raw windows of the images, where kept.
    """

    images: np.ndarray | ImageFile
    record: np.ndarray
    start: np.ndarray
    split: np.ndarray
    file_samples: np.ndarray
    file_rates: np.ndarray
    skipped: list[Skipped] = field(default_factory=list)
    windows: np.ndarray | None = None


def extract_images(
    source: Iterable[FileWindows | Skipped],
    frontend: Frontend,
    *,
    n_records: int,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    keep_windows: bool = False,
    sink: ImageWriter | None = None,
) -> Extracted:
    """Compute the images of every window that ``source`` yields, in batches of at least
    ``batch_size`` windows (:func:`~pipeline.frontend.batches`).

    A file any of whose images is not finite (:func:`finite_images`) is skipped
    whole, with its reason. ``keep_windows`` keeps the raw windows beside the images.
    With a ``sink``, the images are written to it and come back as its
    :class:`~pipeline.features.store.ImageFile`; without one they are held. Files per second
    are logged.

    Raises:
        DataError: no file gave a window.
    """
    gathered = _Gathered(n_records, keep_windows=keep_windows, sink=sink)
    module = STFTImage(frontend.params).to(device)
    t0 = time.perf_counter()
    for run in batches(source, batch_size, lambda item: len(getattr(item, "x", ()))):
        files = [item for item in run if isinstance(item, FileWindows)]
        gathered.skipped += [item for item in run if isinstance(item, Skipped)]
        if files:
            x = np.concatenate([f.x for f in files])
            images = frontend.raw_images(x, device=device, batch_size=batch_size, module=module)
            gathered.add(files, images.cpu().numpy())
    seconds = time.perf_counter() - t0
    log.info(
        "images of %d files in %.1f s (%.0f files/s)%s",
        n_records,
        seconds,
        n_records / max(seconds, 1e-9),
        f", written to {sink.path}" if sink is not None else "",
    )
    return gathered.extracted()


class _Gathered:
    """The images and window facts of the files kept so far, and the files skipped; the raw
    windows only with ``keep_windows`` (otherwise no more than a batch of them is held); the
    images in ``sink`` when there is one."""

    def __init__(
        self, n_records: int, *, keep_windows: bool = False, sink: ImageWriter | None = None
    ) -> None:
        self.n_records = n_records
        self.sink = sink
        self.keep_windows = keep_windows
        self.chunks: list[np.ndarray] = []
        self.windows: list[np.ndarray] = []
        self.record: list[np.ndarray] = []
        self.start: list[np.ndarray] = []
        self.split: list[np.ndarray] = []
        self.skipped: list[Skipped] = []
        self.file_samples = np.full(n_records, -1, dtype=np.int64)
        self.file_rates = np.full(n_records, -1, dtype=np.int64)

    def add(self, files: list[FileWindows], images: np.ndarray) -> None:
        """One batch's files and their images (in order); a file with a non-finite image
        is skipped with :func:`overflow_reason`."""
        ok = finite_images(images)
        at, keep = 0, np.ones(len(images), dtype=bool)
        for f in files:
            rows = slice(at, at + len(f.x))
            at += len(f.x)
            if ok[rows].all():
                self.record.append(np.full(len(f.x), f.index))
                self.start.append(f.start)
                self.split.append(f.split)
                if self.keep_windows:
                    self.windows.append(f.x)
                self.file_samples[f.index] = f.n_samples
                self.file_rates[f.index] = f.source_rate
            else:
                keep[rows] = False
                reason = overflow_reason(f.path, f.x)
                log.warning("skipped %s", reason)
                self.skipped.append(Skipped(f.path, reason))
        kept = images if keep.all() else images[keep]
        if self.sink is not None:
            self.sink.append(kept)
        else:
            self.chunks.append(kept)

    def extracted(self) -> Extracted:
        """Everything gathered as one :class:`Extracted`.

        Raises:
            DataError: no file gave a window.
        """
        if not self.record:
            raise DataError(
                f"none of the {self.n_records} files gave a window; see the skipped files above"
            )
        if self.sink is not None:
            self.sink.close()
            images = ImageFile(self.sink.path)
        else:
            images = np.concatenate(self.chunks)
        return Extracted(
            images=images,
            record=np.concatenate(self.record),
            start=np.concatenate(self.start),
            split=np.concatenate(self.split),
            file_samples=self.file_samples,
            file_rates=self.file_rates,
            skipped=self.skipped,
            windows=np.concatenate(self.windows) if self.keep_windows else None,
        )
