"""Split recordings into train / validation / test, stratified by class and seeded.

The split is decided per recording, never per window: windows of one recording
are near-duplicates, and a split by window would put them on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


def stratified_split(
    labels: Sequence[str], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Assign each item to a split, keeping class proportions.

    Within each class the items are shuffled with a generator seeded by ``seed``
    and cut into test, validation and training parts; every class keeps at least
    one training item, and one test item when ``test_fraction > 0``.

    Args:
        labels: one label per recording.
        val_fraction: share of each class for validation, in [0, 1).
        test_fraction: share of each class for testing, in (0, 1).
        seed: seed of the shuffle.

    Returns:
        ``{"train": idx, "val": idx, "test": idx}``, sorted index arrays that
        partition ``range(len(labels))``.

    Raises:
        ConfigError: the fractions are out of range.
        DataError: a class has too few recordings to appear in train and test.
    """
    for name, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"{name}={value} must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} must be "
            "below 1 so that training data remains"
        )
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for label in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n = len(idx)
        n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
        n_val = round(n * val_fraction)
        if n - n_test - n_val < 1:
            raise DataError(
                f"class {label!r} has {n} recording(s), too few for a train/val/test split "
                f"with data.val_fraction={val_fraction} and data.test_fraction={test_fraction}; "
                "add recordings or lower the fractions"
            )
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}
