"""Read one signal file of any supported format into a :class:`Signal`.

Every reader returns float32 samples of shape (channels, samples) and a sample
rate. Files with no intrinsic rate (NumPy arrays) take the rate the caller
gives; audio files at another rate are resampled with scipy's polyphase
filter. Every failure is a :class:`SignalError` naming the file and the fix.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import scipy.io
import scipy.signal
import soundfile as sf

from pipeline.errors import ConfigError, SignalError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
ARRAY_SUFFIXES = (".npy", ".npz")
TEXT_SUFFIXES = (".csv", ".txt")
MAT_SUFFIXES = (".mat",)
SUFFIXES = AUDIO_SUFFIXES + ARRAY_SUFFIXES + TEXT_SUFFIXES + MAT_SUFFIXES


@dataclass(frozen=True)
class Signal:
    """A multi-channel signal.

    Attributes:
        samples: float32 array of shape (channels, samples).
        sample_rate: samples per second after any resampling.
        source_rate: the file's own rate (equal to ``sample_rate`` when not resampled).
    """

    samples: np.ndarray
    sample_rate: int
    source_rate: int

    @property
    def resampled(self) -> bool:
        return self.sample_rate != self.source_rate

    @property
    def duration_seconds(self) -> float:
        return self.samples.shape[-1] / self.sample_rate


def read_signal(
    path: str | Path,
    *,
    sample_rate: int,
    channels: str | list[int] = "mix",
    mat_key: str | None = None,
    npz_key: str | None = None,
    csv_columns: list[int | str] | None = None,
) -> Signal:
    """Read ``path`` and return it at ``sample_rate`` with the chosen channels.

    Two-dimensional arrays (``.npy``, ``.npz``, ``.mat``) are taken as
    (channels, samples) when they have fewer rows than columns, else as
    (samples, channels): a recording has more samples than channels.

    Args:
        path: a file with one of :data:`SUFFIXES`.
        sample_rate: the rate the pipeline works at; audio at another rate is
            resampled, files with no rate of their own (arrays, text, MATLAB)
            are taken to be at this rate.
        channels: ``"mix"`` averages all channels into one, ``"all"`` keeps
            them, a list of indices keeps those channels in that order.
        mat_key: regular expression that must match exactly one variable name
            of a ``.mat`` file (``re.search``, e.g. ``DE_time``); None takes the
            only numeric variable.
        npz_key: the array of a ``.npz`` file; None takes the only array.
        csv_columns: columns of a ``.csv``/``.txt`` file, by index or header
            name; None takes every column.

    Returns:
        The signal, float32 of shape (channels, samples).

    Raises:
        SignalError: the file cannot be read, is empty, all zero, holds NaN or
            infinite values, has the wrong shape, or lacks a requested channel,
            key or column.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    source_rate = sample_rate
    if suffix in AUDIO_SUFFIXES:
        samples, source_rate = _read_audio(path)
    elif suffix == ".npy":
        samples = _orient(_load_npy(path), path)
    elif suffix == ".npz":
        samples = _orient(_read_npz(path, npz_key), path)
    elif suffix in TEXT_SUFFIXES:
        samples = _read_text(path, csv_columns)
    elif suffix in MAT_SUFFIXES:
        samples = _orient(_read_mat(path, mat_key), path)
    else:
        raise SignalError(
            f"{path}: suffix {suffix!r} is not supported; use one of {', '.join(SUFFIXES)}"
        )
    if samples.shape[-1] == 0:
        raise SignalError(f"{path}: the file holds no samples; remove it or replace it")
    if not np.isfinite(samples).all():
        raise SignalError(f"{path}: the signal holds NaN or infinite values; clean or remove it")
    if not samples.any():
        raise SignalError(f"{path}: every sample is zero; a silent file carries no class")
    samples = select_channels(samples, channels, path=path)
    if source_rate != sample_rate:
        samples = resample(samples, source_rate, sample_rate)
    return Signal(np.ascontiguousarray(samples, dtype=np.float32), sample_rate, source_rate)


def select_channels(samples: np.ndarray, channels: str | list[int], *, path: Path) -> np.ndarray:
    """Pick or mix channels of a (channels, samples) array."""
    if channels == "mix":
        return samples.mean(axis=0, keepdims=True)
    if channels == "all":
        return samples
    if isinstance(channels, str):
        raise ConfigError(f"data.channels={channels!r} must be 'mix', 'all' or a list of indices")
    n = samples.shape[0]
    bad = [c for c in channels if not -n <= c < n]
    if bad:
        raise SignalError(
            f"{path}: has {n} channel(s), so data.channels={list(channels)} is out of range"
        )
    return samples[list(channels)]


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample (..., samples) from ``source_rate`` to ``target_rate`` (polyphase filter)."""
    ratio = Fraction(target_rate, source_rate).limit_denominator(10_000)
    out = scipy.signal.resample_poly(samples, ratio.numerator, ratio.denominator, axis=-1)
    return out.astype(np.float32, copy=False)


def _read_audio(path: Path) -> tuple[np.ndarray, int]:
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)  # (samples, channels)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise SignalError(
            f"{path}: not a readable audio file ({err}); re-export or remove it"
        ) from err
    return data.T, int(rate)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise SignalError(
            f"{path}: not a readable .npy array ({err}); re-save it with numpy.save"
        ) from err


def _read_npz(path: Path, key: str | None) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if key is None and len(keys) == 1:
                key = keys[0]
            if key not in keys:
                hint = f"data.npz_key={key!r} is not among" if key else "pick one of"
                raise SignalError(f"{path}: {hint} its arrays {keys}; set data.npz_key")
            return archive[key]
    except (OSError, ValueError, EOFError) as err:
        raise SignalError(f"{path}: not a readable .npz archive ({err})") from err


def _read_text(path: Path, columns: list[int | str] | None) -> np.ndarray:
    """Numeric columns of a CSV or text file, an optional header line naming them."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError as err:
        raise SignalError(f"{path}: cannot be opened ({err})") from err
    delimiter = next((d for d in (",", ";", "\t") if d in first), None)
    tokens = [
        t.strip().strip('"') for t in (first.split(delimiter) if delimiter else first.split())
    ]
    header = [] if all(_is_number(t) for t in tokens if t) else tokens
    try:
        data = np.loadtxt(
            path, delimiter=delimiter, skiprows=1 if header else 0, ndmin=2, dtype=np.float64
        )  # (samples, columns)
    except ValueError as err:
        raise SignalError(
            f"{path}: not a table of numbers ({err}); keep one header line at most and "
            "numeric columns only, or choose columns with data.csv_columns"
        ) from err
    if columns is not None:
        index = []
        for c in columns:
            if isinstance(c, str):
                if c not in header:
                    raise SignalError(f"{path}: no column named {c!r}; the header has {header}")
                index.append(header.index(c))
            elif not -data.shape[1] <= c < data.shape[1]:
                raise SignalError(
                    f"{path}: has {data.shape[1]} column(s), so data.csv_columns={columns} "
                    "is out of range"
                )
            else:
                index.append(c)
        data = data[:, index]
    return data.T.astype(np.float32)


def _read_mat(path: Path, key: str | None) -> np.ndarray:
    """The variable of a MATLAB file whose name matches ``key`` (v7.3 files via h5py)."""
    try:
        variables = {
            k: v
            for k, v in scipy.io.loadmat(path).items()
            if not k.startswith("__") and isinstance(v, np.ndarray) and v.dtype.kind in "fiu"
        }
    except NotImplementedError:  # scipy: "Please use HDF reader for matlab v7.3 files"
        variables = _read_mat73(path)
    except (OSError, ValueError, TypeError) as err:
        raise SignalError(f"{path}: not a readable MATLAB file ({err})") from err
    names = sorted(variables)
    if key is None:
        matches = names
    else:
        try:
            pattern = re.compile(key)
        except re.error as err:
            raise ConfigError(f"data.mat_key={key!r} is not a regular expression ({err})") from err
        matches = [n for n in names if pattern.search(n)]
    if len(matches) != 1:
        found = "no variable" if not matches else f"{len(matches)} variables {matches}"
        rule = f"data.mat_key={key!r} matches" if key else "without data.mat_key there is"
        raise SignalError(
            f"{path}: {rule} {found} among its numeric variables {names}; "
            "set data.mat_key to a regular expression that picks exactly one"
        )
    return np.asarray(variables[matches[0]])


def _read_mat73(path: Path) -> dict[str, np.ndarray]:
    try:
        import h5py
    except ImportError as err:
        raise SignalError(
            f"{path}: a MATLAB v7.3 (HDF5) file needs h5py; pip install h5py, or re-save "
            "it in MATLAB with save(..., '-v7')"
        ) from err
    try:
        with h5py.File(path, "r") as f:
            # MATLAB writes column-major: h5py sees the dimensions reversed.
            return {
                k: np.asarray(v).T
                for k, v in f.items()
                if isinstance(v, h5py.Dataset) and v.dtype.kind in "fiu"
            }
    except OSError as err:
        raise SignalError(f"{path}: not a readable MATLAB v7.3 file ({err})") from err


def _orient(data: np.ndarray, path: Path) -> np.ndarray:
    """A 1-D or 2-D numeric array as float32 (channels, samples)."""
    if not np.issubdtype(data.dtype, np.number):
        raise SignalError(f"{path}: array dtype {data.dtype} is not numeric")
    data = np.squeeze(data) if data.ndim > 2 else data
    if data.ndim == 1:
        data = data[None, :]
    elif data.ndim == 2:
        if data.shape[0] > data.shape[1]:  # (samples, channels)
            data = data.T
    else:
        raise SignalError(
            f"{path}: array of shape {data.shape} is not 1-D or 2-D; save one signal per file"
        )
    return data.astype(np.float32)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True
