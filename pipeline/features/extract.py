"""Stream windows into STFT images: only the images of the whole dataset are ever held."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.data.dataset import FileWindows, Skipped
from pipeline.errors import DataError
from pipeline.features.stft import STFTParams, compute_images, finite_images, overflow_reason

log = logging.getLogger(__name__)


@dataclass
class Extracted:
    """Images of every window of the usable files.

    Attributes:
        images: float32 (n, channels, height, width), before normalisation; every value finite.
        record: (n,) index of each window's file in the record list.
        start: (n,) start of each window in samples.
        split: (n,) split of each window.
        file_samples: (n_records,) length of each file in samples, -1 if skipped.
        file_rates: (n_records,) each file's own sample rate, -1 if skipped.
        skipped: the files left out, with reasons.
    """

    images: np.ndarray
    record: np.ndarray
    start: np.ndarray
    split: np.ndarray
    file_samples: np.ndarray
    file_rates: np.ndarray
    skipped: list[Skipped] = field(default_factory=list)


def extract_images(
    source: Iterable[FileWindows | Skipped],
    params: STFTParams,
    *,
    n_records: int,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> Extracted:
    """Compute the images of every window that ``source`` yields, ``batch_size`` windows at a time.

    A file any of whose images is not finite (:func:`finite_images`) is skipped
    whole, with its reason.

    Raises:
        DataError: no file gave a window.
    """
    chunks: list[np.ndarray] = []
    pending: list[FileWindows] = []
    n_pending = 0
    record: list[np.ndarray] = []
    start: list[np.ndarray] = []
    split: list[np.ndarray] = []
    file_samples = np.full(n_records, -1, dtype=np.int64)
    file_rates = np.full(n_records, -1, dtype=np.int64)
    skipped: list[Skipped] = []

    def flush() -> None:
        nonlocal pending, n_pending
        if not pending:
            return
        images = compute_images(
            np.concatenate([f.x for f in pending]), params, device=device,
            batch_size=batch_size, progress=False,
        )  # fmt: skip
        ok = finite_images(images)
        at, keep = 0, np.ones(len(images), dtype=bool)
        for f in pending:
            rows = slice(at, at + len(f.x))
            at += len(f.x)
            if ok[rows].all():
                record.append(np.full(len(f.x), f.index))
                start.append(f.start)
                split.append(f.split)
                file_samples[f.index] = f.n_samples
                file_rates[f.index] = f.source_rate
            else:
                keep[rows] = False
                reason = overflow_reason(f.path, f.x)
                log.warning("skipped %s", reason)
                skipped.append(Skipped(f.path, reason))
        chunks.append(images if keep.all() else images[keep])
        pending, n_pending = [], 0

    for item in source:
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        pending.append(item)
        n_pending += len(item.x)
        if n_pending >= batch_size:
            flush()
    flush()
    if not record:
        raise DataError(f"none of the {n_records} files gave a window; see the skipped files above")
    return Extracted(
        images=np.concatenate(chunks),
        record=np.concatenate(record),
        start=np.concatenate(start),
        split=np.concatenate(split),
        file_samples=file_samples,
        file_rates=file_rates,
        skipped=skipped,
    )
