"""Cut a signal into fixed-length windows."""

from __future__ import annotations

import numpy as np


def segment(samples: np.ndarray, *, length: int, hop: int, pad: bool) -> np.ndarray:
    """Cut (channels, samples) into windows of ``length`` samples every ``hop`` samples.

    Args:
        samples: array of shape (channels, n).
        length: window length in samples.
        hop: distance between window starts in samples.
        pad: zero-pad a signal shorter than ``length``, and the tail after the
            last full window when it is at least half a window long; when
            False both are dropped.

    Returns:
        Array of shape (windows, channels, length); zero windows when the signal
        is too short and ``pad`` is False.
    """
    assert length > 0 and hop > 0
    channels, n = samples.shape
    if n < length:
        if not pad:
            return np.empty((0, channels, length), samples.dtype)
        return np.pad(samples, ((0, 0), (0, length - n)))[None]
    starts = list(range(0, n - length + 1, hop))
    tail = n - (starts[-1] + hop)
    if pad and tail >= length // 2 and starts[-1] + length < n:
        samples = np.pad(samples, ((0, 0), (0, starts[-1] + hop + length - n)))
        starts.append(starts[-1] + hop)
    windows = np.lib.stride_tricks.sliding_window_view(samples, length, axis=1)
    # sliding_window_view: (channels, n - length + 1, length) -> (windows, channels, length)
    return np.ascontiguousarray(windows[:, starts].transpose(1, 0, 2))
