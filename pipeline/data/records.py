"""Find the signal files of a dataset and their labels.

Layout: one subfolder per class under ``root``, searched recursively::

    root/healthy/a.wav
    root/imbalance/run3/b.wav
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError
from pipeline.signals import SUFFIXES


@dataclass(frozen=True)
class Record:
    """One signal file and its class label."""

    path: Path
    label: str


def find_records(root: str | Path, *, suffixes: tuple[str, ...] = SUFFIXES) -> list[Record]:
    """List the files under ``root/<class>/`` whose suffix is supported, sorted by path.

    Raises:
        DataError: ``root`` is missing, or holds fewer than two classes with files.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data.root={str(root)!r} is not a folder; point data.root at a folder "
            "with one subfolder of signal files per class"
        )
    records = [
        Record(path, class_dir.name)
        for class_dir in sorted(
            p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        for path in sorted(class_dir.rglob("*"))
        if path.is_file() and path.suffix.lower() in suffixes
    ]
    classes = sorted({r.label for r in records})
    if len(classes) < 2:
        raise DataError(
            f"data.root={str(root)!r} holds files of {len(classes)} class(es) {classes}; "
            f"a classifier needs at least two class subfolders with {'/'.join(suffixes)} files"
        )
    return records
