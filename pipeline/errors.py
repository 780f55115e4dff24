"""One small exception hierarchy.

Every error a user can fix derives from :class:`PipelineError`; the Hydra entry
point prints its message as one line and exits non-zero, never a traceback.
Messages follow one rule: name the key or file, the value, what is allowed, and
the fix.

Below ``tasks/`` a message names the parameter as its function calls it
(``n_fft=0 must be a positive integer``); the task layer, which reads the config,
renames it to the config key once with :func:`config_keys`
(``features.n_fft=0 must be a positive integer``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class PipelineError(Exception):
    """Base class for errors the user can fix.

    Attributes:
        keys: the parameters the message names, as the raising function calls them, for
            :func:`settings` to rename to config keys; empty when there is nothing to rename.
    """

    def __init__(self, *args: object, keys: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.keys = tuple(keys)


class ConfigError(PipelineError, ValueError):
    """A configuration key holds a value the pipeline cannot use."""


class SignalError(PipelineError):
    """A signal file cannot be read or used (unreadable, empty, NaN, too short)."""


class DataError(PipelineError):
    """A dataset as a whole cannot be used (no files, a class with too few files)."""


class BundleError(PipelineError):
    """A saved model bundle is missing, incomplete or of an incompatible format."""


class TrainingError(PipelineError):
    """Training cannot go on (the loss became NaN or infinite)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: the message says which model and epoch stopped.

    Attributes:
        resumable: a checkpoint of the last finished epoch exists, so
            ``train.resume=true`` continues from it.
    """

    def __init__(self, message: str, *, resumable: bool) -> None:
        super().__init__(message)
        self.resumable = resumable


class StorageError(PipelineError, OSError):
    """An output cannot be written because its device is full (or the disk quota is used up).

    An :class:`OSError` too, with ``errno`` ENOSPC, so code that handles a failed write
    handles this one; its message names the path and the fix.
    """


@contextmanager
def config_keys(prefix: str, *, names: Mapping[str, str] | None = None) -> Iterator[None]:
    """Rename the parameters named in a :class:`PipelineError` to config keys.

    A task calls a lower layer inside ``with config_keys("features."):``; an error raised
    there with ``keys`` is raised again, of the same class and without the traceback of
    the first, its message naming each key as the config spells it: the key's first
    mention, and every mention followed by ``=``, becomes ``prefix + key`` (or
    ``names[key]`` where the config names it in another group)::

        n_fft=0 must be a positive integer  ->  features.n_fft=0 must be a positive integer

    Later bare mentions ("raise n_fft") are left as written.

    Args:
        prefix: the config group's path with its dot, e.g. ``"features."``.
        names: full config keys of the parameters that do not live under ``prefix``.
    """
    try:
        yield
    except PipelineError as err:
        if not err.keys:
            raise
        message = str(err)
        for key in err.keys:
            message = _rename(message, key, (names or {}).get(key, prefix + key))
        raise type(err)(message) from None


def _rename(message: str, key: str, full: str) -> str:
    """``message`` with the first mention of ``key``, and each ``key=``, spelled ``full``."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(key)}(?!\w)")
    first = True

    def replace(m: re.Match) -> str:
        nonlocal first
        keep = not first and not message.startswith("=", m.end())
        first = False
        return m.group() if keep else full

    return pattern.sub(replace, message)
