"""Find the signal files of a dataset, their labels, groups and any predefined split.

Layouts (all searched recursively):

* class folders (the default): ``root/<class>/**/file``;
* split folders: ``root/train/<class>/...``, ``root/test/<class>/...`` and
  optionally ``root/val/<class>/...``, a predefined split;
* a manifest CSV with columns ``path,label`` and optional ``split``, ``group``
  (paths relative to the manifest's folder unless absolute);
* labels from file names: ``label_regex`` (first capture group), e.g.
  ``^(\\d+)_`` for ``7_jackson_32.wav``; with it every file under ``root`` counts.

``group_regex`` (first capture group of the file name) names each file's
group (a speaker, a machine, a session) for group-wise splits.

Symbolic links to files are read like the files; links to folders are not
followed (a link back up the tree would loop). Such links, links that loop or
point nowhere, and entries that are not regular files (pipes, sockets) are
counted in :attr:`Found.ignored` with the reason, never silently dropped.
"""

from __future__ import annotations

import csv
import errno
import logging
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError, DataError
from pipeline.signals import SUFFIXES

log = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One signal file.

    Attributes:
        path: the file.
        label: its class.
        group: its group for group-wise splits, or None.
        split: its predefined split (``train``/``val``/``test``), or None.
    """

    path: Path
    label: str
    group: str | None = None
    split: str | None = None


@dataclass
class Found:
    """The records of a dataset and what was left out while finding them.

    Attributes:
        records: usable files, sorted by path.
        ignored: count of files left out per reason (unknown suffix, no label, a
            symbolic link that loops, points nowhere or leads to a folder, not a
            regular file).
        layout: ``class_folders``, ``split_folders``, ``manifest`` or ``label_regex``.
    """

    records: list[Record]
    ignored: dict[str, int] = field(default_factory=dict)
    layout: str = "class_folders"

    @property
    def classes(self) -> list[str]:
        return sorted({r.label for r in self.records})


def find_records(
    root: str | Path,
    *,
    label_regex: str | None = None,
    group_regex: str | None = None,
    manifest: str | Path | None = None,
    suffixes: tuple[str, ...] = SUFFIXES,
) -> Found:
    """List the dataset's files with their labels.

    Raises:
        DataError: the folder or manifest is missing, a regex matches no file,
            or fewer than two classes have files.
        ConfigError: a regex does not compile or has no capture group.
    """
    root = Path(root)
    label_re = compile_regex("data.label_regex", label_regex)
    group_re = compile_regex("data.group_regex", group_regex)
    if manifest is not None:
        found = _from_manifest(Path(manifest), suffixes)
    else:
        if not root.is_dir():
            raise DataError(
                f"data.root={str(root)!r} is not a folder; point data.root at a folder "
                "with one subfolder of signal files per class"
            )
        split_dirs = [d for d in SPLIT_FOLDERS if (root / d).is_dir()]
        if "train" in split_dirs and "test" in split_dirs:
            found = Found([], layout="split_folders")
            for split in split_dirs:
                _walk(root / split, found, label_re, suffixes, split=split)
        else:
            found = Found([], layout="label_regex" if label_re else "class_folders")
            _walk(root, found, label_re, suffixes, split=None)
        if label_re and not found.records:
            raise DataError(
                f"data.label_regex={label_regex!r} matched none of the file names under "
                f"{root}; test the pattern against a name such as "
                f"'{next(iter(root.rglob('*.*')), Path('?')).name}'"
            )
    if group_re:
        found.records = [_with_group(r, group_re, group_regex) for r in found.records]
    found.records.sort(key=lambda r: str(r.path))
    if len(found.classes) < 2:
        where = manifest if manifest is not None else root
        raise DataError(
            f"{where} holds files of {len(found.classes)} class(es) {found.classes}; a "
            "classifier needs at least two classes: one subfolder per class, or set "
            "data.label_regex to take labels from file names"
        )
    for reason, n in found.ignored.items():
        log.info("ignored %d file(s): %s", n, reason)
    return found


def _walk(folder: Path, found: Found, label_re, suffixes, *, split: str | None) -> None:
    ignored = Counter(found.ignored)
    # rglob lists symbolic links but never descends into a linked folder, so a link
    # loop cannot recurse; each odd entry is counted with its reason below.
    for path in sorted(folder.rglob("*")):
        if any(p.startswith(".") for p in path.relative_to(folder).parts):
            continue
        reason = _not_a_file(path)
        if reason:
            ignored[reason] += 1
            continue
        if not path.is_file():  # a folder: its files come on their own
            continue
        if path.suffix.lower() not in suffixes:
            ignored[f"suffix {path.suffix or '(none)'!r} not supported"] += 1
            continue
        if label_re:
            match = label_re.search(path.name)
            if not match or not match.group(1):  # an optional group may match nothing
                ignored["file name does not match data.label_regex"] += 1
                continue
            label = match.group(1)
        else:
            parts = path.relative_to(folder).parts
            if len(parts) < 2:
                ignored["not inside a class folder"] += 1
                continue
            label = parts[0]
        found.records.append(Record(path, label, split=split))
    found.ignored = dict(ignored)


def _not_a_file(path: Path) -> str | None:
    """Why a folder entry that is neither a regular file nor a folder is left out, or None."""
    try:
        mode = os.stat(path).st_mode  # follows links
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself); remove the link"
        if err.errno == errno.ENOENT and path.is_symlink():
            return "broken symbolic link (its target does not exist); remove or fix the link"
        return f"cannot be opened ({err.strerror})"
    if stat.S_ISDIR(mode):
        if path.is_symlink():
            return (
                "symbolic link to a folder (not followed); move or copy the folder under "
                "data.root, or link its files"
            )
        return None
    if not stat.S_ISREG(mode):
        return "not a regular file (a pipe, socket or device)"
    return None


def _from_manifest(manifest: Path, suffixes) -> Found:
    if not manifest.is_file():
        raise DataError(f"data.manifest={str(manifest)!r} does not exist; give the path of a CSV")
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "path" not in columns or "label" not in columns:
            raise DataError(
                f"data.manifest={str(manifest)!r} has columns {columns}; it needs 'path' and "
                "'label' (and optionally 'split', 'group')"
            )
        rows = list(reader)
    found = Found([], layout="manifest")
    ignored: Counter[str] = Counter()
    for i, row in enumerate(rows, start=2):
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLIT_FOLDERS:
            raise DataError(
                f"{manifest}, line {i}: split={split!r} must be one of {list(SPLIT_FOLDERS)}"
            )
        path = Path(row["path"])
        path = path if path.is_absolute() else manifest.parent / path
        if path.suffix.lower() not in suffixes:
            ignored[f"suffix {path.suffix!r} not supported"] += 1
            continue
        if not path.is_file():
            raise DataError(
                f"{manifest}, line {i}: {path} does not exist (manifest paths are relative to "
                "the manifest's folder unless absolute); fix the row or remove it"
            )
        label = (row.get("label") or "").strip()
        if not label:
            raise DataError(f"{manifest}, line {i}: {row['path']} has an empty label; give it one")
        group = (row.get("group") or "").strip() or None
        found.records.append(Record(path, label, group=group, split=split))
    found.ignored = dict(ignored)
    seen: dict[Path, int] = {}
    for i, r in enumerate(found.records):
        key = r.path.resolve()
        if key in seen:
            raise DataError(
                f"{manifest}: {r.path} is listed twice (rows {seen[key] + 2} and {i + 2}); a "
                "file in two rows could land in two splits: keep one row per file"
            )
        seen[key] = i
    return found


def _with_group(record: Record, group_re: re.Pattern, pattern: str) -> Record:
    match = group_re.search(record.path.name)
    if not match:
        raise DataError(
            f"data.group_regex={pattern!r} does not match the file name {record.path.name!r} "
            f"({record.path}); every file needs a group for data.split=group"
        )
    return Record(record.path, record.label, group=match.group(1), split=record.split)


def compile_regex(key: str, pattern: str | None) -> re.Pattern | None:
    """``pattern`` compiled, None for none; a ConfigError naming ``key`` when it is not a
    regular expression or has no capture group."""
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{key}={pattern!r} is not a regular expression ({err})") from err
    if compiled.groups < 1:
        raise ConfigError(
            f"{key}={pattern!r} has no capture group; put the part to keep in parentheses, "
            "e.g. '^(\\d+)_'"
        )
    return compiled
