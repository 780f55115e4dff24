"""Split recordings into train / validation / test, stratified by class and seeded.

The split is decided per recording, never per window: windows of one recording
are near-duplicates, and a split by window would put them on both sides.

Errors name the arguments as written here (``val_fraction=1.5``); the task layer
renames them to config keys (:func:`pipeline.errors.config_keys`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np

from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

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
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"{name}={value} must be in [0, 1)", keys=(name,))
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} must be below 1 so "
            "that training data remains",
            keys=("val_fraction", "test_fraction"),
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
                f"with val_fraction={val_fraction} and test_fraction={test_fraction}; add "
                "recordings or lower the fractions",
                keys=("val_fraction", "test_fraction"),
            )
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


STRATEGIES = ("auto", "random", "group", "time", "regex", "folders", "manifest")


def split_records(
    records: Sequence,
    *,
    strategy: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    test_regex: str | None = None,
    test_groups: Sequence[str] | None = None,
    val_groups: Sequence[str] | None = None,
) -> np.ndarray:
    """Assign each record (file) to ``train``, ``val`` or ``test``, before any segmentation.

    Strategies:
        ``random``: stratified by class, ``val_fraction`` and ``test_fraction``
        of each class. ``group``: whole groups (``Record.group``) go to test:
        ``test_groups``, or a seeded draw of ``test_fraction`` of the groups;
        validation takes whole groups of the rest the same way (or
        ``val_groups``; an empty list and ``val_fraction=0`` give none). ``regex``:
        files whose path matches ``test_regex`` are the test split. ``folders``
        and ``manifest``: the split each record carries. ``time``: every
        record is ``"time"``; its windows are split by position later (see
        :func:`pipeline.data.dataset.time_regions`). ``auto``: ``folders`` or
        ``manifest`` when the records carry a split, else ``random``.
        Where no validation files are given, they are drawn from the training
        side, stratified: ``val_fraction`` of it.

    Returns:
        An array of split names, one per record.

    Raises:
        ConfigError: an unknown strategy or a missing strategy setting.
        DataError: a class or group is missing where the split needs it.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"split={strategy!r} must be one of {list(STRATEGIES)}", keys=("split",))
    labels = np.array([r.label for r in records])
    carried = [r.split for r in records]
    if strategy == "auto":
        strategy = "folders" if any(carried) else "random"
    if strategy == "random":
        parts = stratified_split(
            labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
        out = np.empty(len(records), dtype=object)
        for name, idx in parts.items():
            out[idx] = name
        return out.astype(str)
    if strategy == "time":
        return np.full(len(records), "time")
    if strategy in ("folders", "manifest"):
        out = _carried_split(records, strategy)
    elif strategy == "regex":
        out = _regex_split(records, test_regex)
    else:
        out = _split_groups(records, val_fraction, test_fraction, seed, test_groups, val_groups)
    if strategy != "group" and not (out == "val").any() and val_fraction > 0:
        _draw_validation(out, labels, val_fraction=val_fraction, seed=seed)
    _check_classes(labels, out.astype(str), strategy)
    return out.astype(str)


def _carried_split(records: Sequence, strategy: str) -> np.ndarray:
    """The split each record carries (its folder or manifest row); every record needs one."""
    carried = [r.split for r in records]
    if not all(carried):
        missing = next(r.path for r in records if not r.split)
        raise DataError(
            f"split={strategy} needs a split for every file; {missing} has none (put it under "
            "train/, val/ or test/, or fill the manifest's split column)",
            keys=("split",),
        )
    out = np.full(len(records), "train", dtype=object)
    out[:] = carried
    return out


def _regex_split(records: Sequence, test_regex: str | None) -> np.ndarray:
    """``test`` for the records whose path matches ``test_regex``, ``train`` for the rest."""
    if not test_regex:
        raise ConfigError(
            "split=regex needs test_regex, e.g. '_[0-4]\\.wav$'", keys=("split", "test_regex")
        )
    try:
        pattern = re.compile(test_regex)
    except re.error as err:
        raise ConfigError(
            f"test_regex={test_regex!r} is not a regular expression ({err})", keys=("test_regex",)
        ) from err
    is_test = np.array([bool(pattern.search(str(r.path))) for r in records])
    if not is_test.any() or is_test.all():
        raise DataError(
            f"test_regex={test_regex!r} matches {int(is_test.sum())} of {len(records)} files; "
            "it must pick some but not all of them",
            keys=("test_regex",),
        )
    out = np.full(len(records), "train", dtype=object)
    out[is_test] = "test"
    return out


def _draw_validation(out: np.ndarray, labels: np.ndarray, *, val_fraction: float, seed: int):
    """Mark ``val_fraction`` of the training side of ``out`` as ``val``, stratified, in place."""
    train = np.flatnonzero(out == "train")
    parts = stratified_split(labels[train], val_fraction=val_fraction, test_fraction=0, seed=seed)
    out[train[parts["val"]]] = "val"


def _split_groups(
    records, val_fraction, test_fraction, seed, test_groups, val_groups
) -> np.ndarray:
    groups = np.array([r.group for r in records], dtype=object)
    if any(g is None for g in groups):
        raise ConfigError(
            "split=group needs a group for every file: set group_regex (e.g. "
            "'^\\d+_([a-z]+)_' for 7_jackson_32.wav) or a manifest 'group' column",
            keys=("split", "group_regex"),
        )
    names = sorted(set(groups.tolist()))
    rng = np.random.default_rng(seed)
    if test_groups:
        unknown = sorted(set(test_groups) - set(names))
        if unknown:
            raise DataError(
                f"test_groups={list(test_groups)}: {unknown} not among the groups {names}",
                keys=("test_groups",),
            )
        test = set(test_groups)
    else:
        if len(names) < 2:
            raise DataError(
                f"split=group needs at least two groups; found {names}", keys=("split",)
            )
        n_test = min(len(names) - 1, max(1, round(len(names) * test_fraction)))
        test = set(rng.permutation(names)[:n_test].tolist())
    rest = [g for g in names if g not in test]
    if not rest:
        raise DataError(
            f"test_groups={sorted(test)} leaves no group for training", keys=("test_groups",)
        )
    val: set[str] = set()
    if val_groups:
        wrong = sorted(set(val_groups) - set(rest))
        if wrong:
            raise DataError(
                f"val_groups={list(val_groups)}: {wrong} not among the training groups {rest}; "
                "pick validation groups that are neither held out nor unknown",
                keys=("val_groups",),
            )
        if set(val_groups) == set(rest):
            raise DataError(
                f"val_groups={list(val_groups)} leaves no group for training; leave at least "
                "one of them out",
                keys=("val_groups",),
            )
        val = set(val_groups)
    elif val_fraction > 0 and len(rest) >= 2:
        n_val = min(len(rest) - 1, max(1, round(len(rest) * val_fraction)))
        val = set(rng.permutation(rest)[:n_val].tolist())
    out = np.full(len(records), "train", dtype=object)
    out[np.isin(groups, list(test))] = "test"
    out[np.isin(groups, list(val))] = "val"
    if not val and val_fraction > 0:  # one training group: validation by file within it
        labels = np.array([r.label for r in records])
        _draw_validation(out, labels, val_fraction=val_fraction, seed=seed)
    return out


def _check_classes(labels: np.ndarray, split: np.ndarray, strategy: str) -> None:
    for c in sorted(set(labels.tolist())):
        if not ((labels == c) & (split == "train")).any():
            raise DataError(
                f"class {c!r} has no training files under split={strategy}; add files of that "
                "class to the training side or remove the class",
                keys=("split",),
            )
        if not ((labels == c) & (split == "test")).any():
            log.warning("class %r has no test files under data.split=%s", c, strategy)
