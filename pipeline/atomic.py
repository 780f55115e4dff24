"""Atomic writes: a reader never sees a half-written output, and a full disk says so.

Each writer writes to a temporary file in the destination's folder, flushes it to
the device (:func:`os.fsync`) and renames it over the destination with
:func:`os.replace`, which is atomic on POSIX and Windows when both paths are on the
same file system; the folder is then flushed too, so the rename survives a power
cut.

A temporary is named ``.<name>.<host>.<pid>.<random>.tmp``: the destination's name,
then who writes it (this machine and process). A killed writer cannot remove its
temporary, so the next write into the same folder removes the temporaries of the
same destination that are stale (:func:`is_stale`): those whose writer is a process
of this machine that no longer runs, and those of another machine (or of the
naming before this one, ``.<name>.<random>.tmp``) untouched for
:data:`STALE_SECONDS`. A temporary of a running process is never removed.

A write that fails because the device is full (or the disk quota is used up) raises
:class:`~pipeline.errors.StorageError`, one line naming the path, whatever the
writer raised: ``OSError(ENOSPC)``, numpy's short-write ``OSError`` without an
errno, or ``torch.save``'s ``RuntimeError`` (``unexpected pos``, ``basic_ios::clear``)
whose cause is hidden; the last two are recognised by the file system's free space
(:func:`os.statvfs`) at the moment of the failure, before the temporary is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import socket
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import StorageError

# A temporary of another machine (whose processes cannot be seen) is abandoned after this long.
STALE_SECONDS = 3600
# Less free space than this after a failed write means the write ran out of it: a write
# that fails part-way has filled the device up to its last partial block.
FULL_BYTES = 1 << 20
FULL_ERRNOS = {errno.ENOSPC: "the device is full"}
if hasattr(errno, "EDQUOT"):
    FULL_ERRNOS[errno.EDQUOT] = "the disk quota is used up"
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp")
_LEGACY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")  # mkstemp's own, before the pid


def _host() -> str:
    """This machine and pid namespace (containers may share a hostname): ``[A-Za-z0-9-]+``."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:32] or "host"
    with contextlib.suppress(OSError):
        name += f"-{os.stat('/proc/self/ns/pid').st_ino:x}"
    return name


HOST = _host()


def temp_prefix(name: str) -> str:
    """``.<name>.<host>.<pid>.``: the start of a temporary's name for destination ``name``."""
    return f".{name}.{HOST}.{os.getpid()}."


def is_stale(path: Path, *, now: float | None = None) -> bool:
    """Whether the temporary ``path`` (a file or folder) belongs to a writer that has ended.

    A temporary of this machine is stale when its process no longer runs; any other
    (another machine's, or one without a process id) when it was not modified (for a
    folder: no file created in it) for :data:`STALE_SECONDS`.
    """
    m = _TEMP.fullmatch(path.name)
    if m and m["host"] == HOST:
        return not _running(int(m["pid"]))
    now = time.time() if now is None else now
    try:
        return now - path.stat().st_mtime > STALE_SECONDS
    except OSError:  # removed meanwhile
        return False


def _running(pid: int) -> bool:
    """Whether process ``pid`` of this machine exists (unknown counts as running)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process
        return True
    return True


def destination(name: str) -> str | None:
    """The destination's name of the temporary named ``name``, or None if it is none."""
    m = _TEMP.fullmatch(name) or _LEGACY.fullmatch(name)
    return m["name"] if m else None


def _remove_stale(folder: Path, name: str) -> None:
    """Remove the stale temporaries of destination ``folder / name``."""
    now = time.time()
    with os.scandir(folder) as it:
        ours = [
            Path(e.path)
            for e in it
            if e.name.startswith(f".{name}.") and destination(e.name) == name
        ]
    for path in ours:
        if is_stale(path, now=now):
            with contextlib.suppress(OSError):
                path.unlink()


def full_device(err: BaseException, *, folder: Path) -> str | None:
    """Why ``err`` means the device holding ``folder`` is full, or None if it does not.

    Checked before the failed write's temporary is removed: removing it frees space.
    """
    seen = err
    while seen is not None:  # OSError(ENOSPC) hidden as the cause of another error
        if isinstance(seen, OSError) and seen.errno in FULL_ERRNOS:
            return FULL_ERRNOS[seen.errno]
        seen = seen.__cause__ or seen.__context__
    if not isinstance(err, OSError | RuntimeError):
        return None
    free, inodes_left = _free(folder)
    if free is not None and (free < FULL_BYTES or not inodes_left):
        return "the device is full"
    return None


def _free(folder: Path) -> tuple[int | None, bool]:
    """Bytes free to this user on ``folder``'s device (None if unknown), and whether inodes are."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return None, True
    return st.f_bavail * st.f_frsize, st.f_files == 0 or st.f_favail > 0


def storage_error(err: BaseException, *, path: Path, folder: Path) -> StorageError | None:
    """A :class:`StorageError` for writing ``path`` if ``err`` comes from a full device.

    Args:
        err: what the writer raised.
        path: the file (or folder) being written, named in the message.
        folder: a folder on the same device whose free space tells.
    """
    if isinstance(err, StorageError):
        return err
    reason = full_device(err, folder=folder)
    if reason is None:
        return None
    free, _ = _free(folder)
    left = "" if free is None else f" ({free / 1e6:.1f} MB free)"
    out = StorageError(
        f"{path}: cannot be written: {reason}{left}; free space there or write to a folder "
        "on another device"
    )
    out.errno = errno.ENOSPC
    return out


def release(err: BaseException) -> None:
    """Drop the local variables of the frames in ``err``'s tracebacks (and its causes').

    torch.save's writer, a local of one of them, holds the failed temporary open, and
    its space taken after the temporary is removed, for as long as the error is kept.
    """
    seen = err
    while seen is not None:
        traceback.clear_frames(seen.__traceback__)
        seen = seen.__cause__ or seen.__context__


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to its device (folders only on POSIX)."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    The file gets the usual permissions of a new file (0666 less the umask), not the
    0600 of :func:`tempfile.mkstemp`, so reports stay readable by a web server or a
    colleague as any other output would be. Stale temporaries of ``path`` left by
    killed writers are removed first.

    Raises:
        StorageError: the device is full, in the body, the flush or the rename.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path.parent, path.name)
        fd, name = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~current_umask())
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except Exception as err:
        full = storage_error(err, path=path, folder=path.parent)
        if full is None or full is err:
            raise
        release(err)
        raise full from err
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask."""
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    A file name that is not valid UTF-8 (its undecodable bytes held as surrogates) is
    written with those bytes escaped (``\\xff``), so the output stays valid UTF-8.

    Raises:
        StorageError: the device is full.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON to ``path`` atomically.

    NaN and infinities (the validation loss of a run without validation, say) are
    written as ``null``: Python's ``NaN`` is not JSON and other readers reject it.

    Raises:
        StorageError: the device is full.
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
