"""Read one signal file of any supported format into a :class:`Signal`.

Every reader returns float32 samples of shape (channels, samples) and a sample
rate. Files with no intrinsic rate (NumPy arrays) take the rate the caller
gives; audio files at another rate are resampled with scipy's polyphase
filter. Every failure is a :class:`SignalError` naming the file and the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf

from pipeline.errors import ConfigError, SignalError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
ARRAY_SUFFIXES = (".npy",)
SUFFIXES = AUDIO_SUFFIXES + ARRAY_SUFFIXES


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
) -> Signal:
    """Read ``path`` and return it at ``sample_rate`` with the chosen channels.

    Args:
        path: a file with one of :data:`SUFFIXES`.
        sample_rate: the rate the pipeline works at; audio at another rate is
            resampled, arrays are taken to be at this rate.
        channels: ``"mix"`` averages all channels into one, ``"all"`` keeps
            them, a list of indices keeps those channels in that order.

    Returns:
        The signal, float32 of shape (channels, samples).

    Raises:
        SignalError: the file cannot be read, is empty, holds NaN or infinite
            values, or lacks a requested channel.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in AUDIO_SUFFIXES:
        samples, source_rate = _read_audio(path)
    elif suffix in ARRAY_SUFFIXES:
        samples, source_rate = _read_npy(path), sample_rate
    else:
        raise SignalError(
            f"{path}: suffix {suffix!r} is not supported; use one of {', '.join(SUFFIXES)}"
        )
    if samples.shape[-1] == 0:
        raise SignalError(f"{path}: the file holds no samples; remove it or replace it")
    if not np.isfinite(samples).all():
        raise SignalError(f"{path}: the signal holds NaN or infinite values; clean or remove it")
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


def _read_npy(path: Path) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SignalError(
            f"{path}: not a readable .npy array ({err}); re-save it with numpy.save"
        ) from err
    if data.ndim == 1:
        data = data[None, :]
    elif data.ndim == 2:
        # Store (channels, samples); a tall array is taken as (samples, channels).
        if data.shape[0] > data.shape[1]:
            data = data.T
    else:
        raise SignalError(
            f"{path}: array of shape {data.shape} is not 1-D or 2-D; save one signal per file"
        )
    if not np.issubdtype(data.dtype, np.number):
        raise SignalError(f"{path}: array dtype {data.dtype} is not numeric")
    return data.astype(np.float32)
