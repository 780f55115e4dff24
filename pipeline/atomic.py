"""Atomic writes: a reader never sees a half-written output.

Each writer writes to a temporary file in the destination's folder and renames
it over the destination with :func:`os.replace`, which is atomic on POSIX and
Windows when both paths are on the same file system.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    The file gets the usual permissions of a new file (0666 less the umask), not the
    0600 of :func:`tempfile.mkstemp`, so reports stay readable by a web server or a
    colleague as any other output would be.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask."""
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON to ``path`` atomically.

    NaN and infinities (the validation loss of a run without validation, say) are
    written as ``null``: Python's ``NaN`` is not JSON and other readers reject it.
    """
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, allow_nan=False)
    return write_text(path, text + "\n")


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
