"""A long audio file read in blocks of windows, never whole.

:meth:`pipeline.frontend.Frontend.windows` reads a file whole and then cuts it: for a
recording of an hour that is the whole signal, its float64 channel mix and every window
at once, and predict's classifier then takes all of them in one batch. :func:`read_blocks`
gives the same windows ``block`` at a time, each block read from the file by frame
offset (``SoundFile.seek``), mixed, resampled and cut as the whole-file path does:

    file frames [S, E) --mix, resample--> samples [a, b) at the working rate
        --cut at the file's window starts--> windows first .. first + block - 1

Resampling is the same polyphase filter (:func:`pipeline.signals.resample`); a block is
read with a margin wider than the filter on each side, starting at a multiple of the
ratio's denominator, so its samples equal the whole file's, bit for bit (the tests
compare them). The checks of :func:`pipeline.signals.read_signal` hold with the same
words, a block at a time: finite samples, and, over the whole file, not all zero.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.errors import SignalError
from pipeline.frontend import Frontend, Segmenting
from pipeline.signals import AUDIO_FORMATS, AUDIO_SUFFIXES, resample, select_channels


@dataclass(frozen=True)
class Part:
    """Some of a long file's windows.

    Attributes:
        x: float32 (n, channels, length): the file's windows ``first`` .. ``first + n - 1``.
        first: the index of the first of them in the file.
        last: whether they end the file.
    """

    x: np.ndarray
    first: int
    last: bool


def window_starts(n: int, seg: Segmenting) -> np.ndarray:
    """(windows,) the start sample of each window :func:`pipeline.data.segments.segment`
    cuts from ``n`` samples (a zero-padded tail window included)."""
    if n < seg.length:
        return np.zeros(1 if seg.pad else 0, np.int64)
    starts = np.arange(0, n - seg.length + 1, seg.hop, dtype=np.int64)
    tail = n - (starts[-1] + seg.hop)
    if seg.pad and tail >= seg.length // 2 and starts[-1] + seg.length < n:
        starts = np.append(starts, starts[-1] + seg.hop)
    return starts


def _ratio(source_rate: int, rate: int) -> tuple[int, int]:
    """(up, down) of the resampling, as :func:`pipeline.signals.resample` reduces it."""
    ratio = Fraction(rate, source_rate).limit_denominator(10_000)
    return ratio.numerator, ratio.denominator


def working_samples(path: str | Path, frontend: Frontend) -> int | None:
    """The file's length at the working rate, for an audio file; None for another file
    or one soundfile cannot open (the whole-file read reports why)."""
    if Path(path).suffix.lower() not in AUDIO_SUFFIXES:
        return None
    try:
        info = sf.info(os.fsencode(path))
    except (sf.LibsndfileError, RuntimeError, ValueError):
        return None
    if info.frames <= 0 or info.samplerate <= 0:
        return None
    up, down = _ratio(int(info.samplerate), frontend.sample_rate)
    return -(-info.frames * up // down)  # resample_poly's length: ceil(frames * up / down)


def streamed(path: str | Path, frontend: Frontend, *, block: int) -> bool:
    """Whether ``path`` is an audio file of more than ``block`` windows (read in blocks)."""
    n = working_samples(path, frontend)
    return n is not None and len(window_starts(n, frontend.segmenting)) > block


def read_blocks(
    path: str | Path, frontend: Frontend, *, channels: int, block: int
) -> Iterator[Part | str]:
    """The windows of an audio file ``block`` at a time, as :meth:`Frontend.windows` cuts
    them; where the file cannot be classified, the reason (a string) ends the parts."""
    try:
        yield from _blocks(Path(path), frontend, channels=channels, block=block)
    except SignalError as err:
        yield str(err)


def _open(path: Path) -> sf.SoundFile:
    """The audio file, open, checked to hold the container its suffix names."""
    try:
        f = sf.SoundFile(os.fsencode(path))  # bytes: any file name, UTF-8 or not
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise SignalError(
            f"{path}: not a readable audio file ({err}); re-export or remove it"
        ) from err
    allowed = AUDIO_FORMATS[path.suffix.lower()]
    if f.format not in allowed:
        f.close()
        raise SignalError(
            f"{path}: holds a {f.format} file, not {' or '.join(allowed)} as its suffix "
            "says; rename it to its real type or re-export it"
        )
    return f


def _blocks(path: Path, frontend: Frontend, *, channels: int, block: int) -> Iterator[Part]:
    seg, rate = frontend.segmenting, frontend.sample_rate
    pick = frontend.read.get("channels", "mix")
    with _open(path) as f:
        up, down = _ratio(int(f.samplerate), rate)
        n = -(-f.frames * up // down)
        starts = window_starts(n, seg)
        heard = False  # a sample that is not zero, somewhere in the file
        for first in range(0, len(starts), block):
            at = starts[first : first + block]
            a, b = int(at[0]), int(at[-1]) + seg.length
            chosen, raw = _samples(f, path, a, min(b, n), up=up, down=down, rate=rate, pick=pick)
            heard = heard or bool(raw.any())
            if chosen.shape[0] != channels:
                raise SignalError(
                    f"{path}: has {chosen.shape[0]} channel(s) where the windows have "
                    f"{channels}; read the same channels from every file (channels=mix, or "
                    "channel indices every file has)"
                )
            if b > n:  # the zero-padded tail window, as segment() pads it
                chosen = np.pad(chosen, ((0, 0), (0, b - n)))
            view = np.lib.stride_tricks.sliding_window_view(chosen, seg.length, axis=1)
            # (channels, b - a - length + 1, length) -> (windows, channels, length)
            x = np.ascontiguousarray(view[:, at - a].transpose(1, 0, 2))
            last = first + block >= len(starts)
            if last and not heard:
                raise SignalError(f"{path}: every sample is zero; a silent file carries no class")
            yield Part(x, first, last)


def _samples(
    f: sf.SoundFile, path: Path, a: int, b: int, *, up: int, down: int, rate: int, pick
) -> tuple[np.ndarray, np.ndarray]:
    """Samples [a, b) at the working rate of the channels ``pick`` chooses (channels,
    b - a) float32, as :func:`pipeline.signals.read_signal` makes them (mixed in float64,
    then resampled), and the file's frames they came from (file channels, frames)."""
    if up == down == 1:
        raw = _read(f, path, a, b)
        return np.ascontiguousarray(select_channels(raw, pick, path=path), np.float32), raw
    # A margin of whole filter lengths (resample_poly's half-length is 10 * max(up, down)
    # taps at the upsampled rate), from a multiple of ``down``: the output's phase is the
    # whole file's, so the samples are its very samples.
    margin = (-(-(10 * max(up, down) // up + 2) // down) + 1) * down
    start = max(0, (a // up) * down - margin)
    stop = min(f.frames, -(-b * down // up) + margin)
    raw = _read(f, path, start, stop)
    out = resample(select_channels(raw, pick, path=path), int(f.samplerate), rate)
    offset = start * up // down
    out = np.ascontiguousarray(out[:, a - offset : b - offset])
    if not np.isfinite(out).all():
        raise SignalError(
            f"{path}: peak magnitude {float(np.abs(raw).max()):.3g} leaves float32's range "
            f"after resampling from {f.samplerate} Hz to {rate} Hz; such values are rarely a "
            "signal (bytes of another type read as floats?): check the file, or rescale it"
        )
    return out, raw


def _read(f: sf.SoundFile, path: Path, start: int, stop: int) -> np.ndarray:
    """Frames [start, stop) of the open file, (channels, frames) float32, checked finite."""
    f.seek(start)
    raw = f.read(stop - start, dtype="float32", always_2d=True).T
    finite = np.isfinite(raw)
    if not finite.all():
        raise SignalError(
            f"{path}: the signal holds {finite.size - np.count_nonzero(finite)} NaN or "
            f"infinite value(s) among the {finite.size} of frames {start} to {stop}; clean or "
            "remove it"
        )
    return raw


class Assembler:
    """A streamed file's window probabilities put back together from its parts (small
    beside its images: (windows, classes)); a whole file passes through."""

    def __init__(self) -> None:
        self.failed: Path | None = None  # the file whose parts are refused
        self._path: Path | None = None
        self._probs: list[np.ndarray] = []
        self._starts: list[np.ndarray] = []

    def skips(self, path: Path) -> bool:
        """Whether ``path``'s parts are refused (one of its parts already was)."""
        return path == self.failed

    def drop(self, path: Path) -> None:
        """Forget the parts of ``path`` so far, and refuse the rest (its error is written)."""
        self.failed = path
        if self._path == path:
            self._path, self._probs, self._starts = None, [], []

    def add(self, f, probs: np.ndarray):
        """``(f, probs)`` of a whole file (``f``: predict's file record with ``first`` and
        ``last``), once its last part came; None before."""
        if f.first == 0 and f.last:
            return f, probs
        if f.first == 0:
            self._path, self._probs, self._starts = f.path, [], []
        assert f.path == self._path, "the parts of a file arrive together, in order"
        self._probs.append(probs)
        self._starts.append(f.starts)
        if not f.last:
            return None
        p, starts = np.concatenate(self._probs), np.concatenate(self._starts)
        self._path, self._probs, self._starts = None, [], []
        return replace(f, n=len(p), starts=starts, first=0), p
