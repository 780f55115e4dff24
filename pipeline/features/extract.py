"""Stream windows into STFT images: only the images of the whole dataset are ever held."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.data.dataset import FileWindows, Skipped
from pipeline.errors import DataError
from pipeline.features.stft import STFTParams, compute_images


@dataclass
class Extracted:
    """Images of every window of the usable files.

    Attributes:
        images: float32 (n, channels, height, width), before normalisation.
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

    Raises:
        DataError: no file gave a window.
    """
    chunks: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    n_pending = 0
    record, start, split = [], [], []
    file_samples = np.full(n_records, -1, dtype=np.int64)
    file_rates = np.full(n_records, -1, dtype=np.int64)
    skipped: list[Skipped] = []

    def flush() -> None:
        nonlocal pending, n_pending
        if pending:
            x = np.concatenate(pending)
            chunks.append(
                compute_images(x, params, device=device, batch_size=batch_size, progress=False)
            )
            pending, n_pending = [], 0

    for item in source:
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        pending.append(item.x)
        n_pending += len(item.x)
        record.append(np.full(len(item.x), item.index))
        start.append(item.start)
        split.append(item.split)
        file_samples[item.index] = item.n_samples
        file_rates[item.index] = item.source_rate
        if n_pending >= batch_size:
            flush()
    flush()
    if not chunks:
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
