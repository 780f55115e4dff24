"""One small exception hierarchy.

Every error a user can fix derives from :class:`PipelineError`; the Hydra entry
point prints its message as one line and exits non-zero, never a traceback.
Messages follow one rule: name the key or file, the value, what is allowed, and
the fix.
"""


class PipelineError(Exception):
    """Base class for errors the user can fix."""


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
