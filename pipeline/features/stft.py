"""STFT images: pure functions, a thin module that holds the window, and normalisation.

Every parameter is explicit and carries torchaudio's name; nothing is inherited
from a library default, because torchaudio and librosa disagree on several
(hop ``win_length // 2`` against ``// 4``, padding ``reflect`` against
``constant``) and an unwritten default silently changes the image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

WINDOWS = {
    "hann": torch.hann_window,
    "hamming": torch.hamming_window,
    "blackman": torch.blackman_window,
    "rectangular": torch.ones,
}
SCALES = ("magnitude", "power", "db", "log1p")
PAD_MODES = ("reflect", "constant", "replicate", "circular")


@dataclass(frozen=True)
class STFTParams:
    """Every setting of the image, under torchaudio's names.

    Attributes:
        n_fft: FFT size; the image has ``n_fft // 2 + 1`` frequency bins before resizing.
        hop_length: samples between frames.
        win_length: window length in samples, at most ``n_fft``.
        window: one of :data:`WINDOWS` (periodic form).
        center: pad ``n_fft // 2`` samples on both sides, so frame t is centred
            at sample ``t * hop_length``.
        pad_mode: padding used when ``center`` is true.
        power: 1 for magnitude, 2 for power.
        scale: ``db`` (10·log10 of power or 20·log10 of magnitude), ``log1p``,
            ``magnitude`` or ``power`` (left as computed).
        top_db: with ``db``, floor each image at its maximum minus ``top_db``; None for no floor.
        size: ``(height, width)`` to resize to by area averaging, or None for the native size.
    """

    n_fft: int
    hop_length: int
    win_length: int
    window: str
    center: bool
    pad_mode: str
    power: float
    scale: str
    top_db: float | None
    size: tuple[int, int] | None

    def __post_init__(self) -> None:
        for key in ("n_fft", "hop_length", "win_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"features.{key}={value!r} must be a positive integer")
        if self.win_length > self.n_fft:
            raise ConfigError(
                f"features.win_length={self.win_length} must not exceed features.n_fft={self.n_fft}"
            )
        if self.window not in WINDOWS:
            raise ConfigError(f"features.window={self.window!r} must be one of {sorted(WINDOWS)}")
        if self.pad_mode not in PAD_MODES:
            raise ConfigError(
                f"features.pad_mode={self.pad_mode!r} must be one of {list(PAD_MODES)}"
            )
        if self.power not in (1, 2):
            raise ConfigError(f"features.power={self.power!r} must be 1 (magnitude) or 2 (power)")
        if self.scale not in SCALES:
            raise ConfigError(f"features.scale={self.scale!r} must be one of {list(SCALES)}")
        if self.top_db is not None and not self.top_db > 0:
            raise ConfigError(f"features.top_db={self.top_db!r} must be positive or null")
        if self.size is not None and (
            len(self.size) != 2 or any(not isinstance(s, int) or s < 1 for s in self.size)
        ):
            raise ConfigError(
                f"features.size={list(self.size)!r} must be [height, width] in pixels, or null for "
                "the native size"
            )

    def n_frames(self, n_samples: int) -> int:
        """Number of STFT frames for a signal of ``n_samples``."""
        if self.center:
            return 1 + n_samples // self.hop_length
        return 1 + (n_samples - self.n_fft) // self.hop_length

    def image_shape(self, n_samples: int) -> tuple[int, int]:
        """(height, width) of the image of a signal of ``n_samples``."""
        return (
            self.size if self.size is not None else (self.n_fft // 2 + 1, self.n_frames(n_samples))
        )


def make_window(params: STFTParams, device: torch.device | str | None = None) -> Tensor:
    """The analysis window, shape (win_length,)."""
    if params.window == "rectangular":
        return torch.ones(params.win_length, device=device)
    return WINDOWS[params.window](params.win_length, periodic=True, device=device)


def stft_image(x: Tensor, window: Tensor, params: STFTParams) -> Tensor:
    """Time-frequency image of signal windows.

    Args:
        x: Tensor of dimension (..., channels, samples).
        window: Tensor of dimension (win_length,), see :func:`make_window`.
        params: the image settings.

    Returns:
        Tensor of dimension (..., channels, freq, time), where freq is
        ``n_fft // 2 + 1`` and time is ``params.n_frames(samples)``, or
        ``params.size`` when set.
    """
    if not params.center and x.shape[-1] < params.n_fft:
        raise ConfigError(
            f"features.n_fft={params.n_fft} is longer than the {x.shape[-1]}-sample windows and "
            "features.center=false; lower n_fft or set center=true"
        )
    spec = AF.spectrogram(
        x,
        pad=0,
        window=window,
        n_fft=params.n_fft,
        hop_length=params.hop_length,
        win_length=params.win_length,
        power=params.power,
        normalized=False,
        center=params.center,
        pad_mode=params.pad_mode,
        onesided=True,
    )  # (..., channels, freq, time)
    if params.scale == "db":
        multiplier = 10.0 if params.power == 2 else 20.0
        lead = spec.shape[:-3]
        spec = AF.amplitude_to_DB(
            spec.reshape(
                -1, *spec.shape[-3:]
            ),  # top_db floors per item over (channels, freq, time)
            multiplier=multiplier,
            amin=1e-10,
            db_multiplier=0.0,
            top_db=params.top_db,
        ).reshape(*lead, *spec.shape[-3:])
    elif params.scale == "log1p":
        spec = torch.log1p(spec)
    if params.size is not None:
        lead = spec.shape[:-3]
        spec = F.adaptive_avg_pool2d(spec.reshape(-1, *spec.shape[-3:]), params.size)
        spec = spec.reshape(*lead, *spec.shape[-3:])
    return spec


class STFTImage(nn.Module):
    """Module form of :func:`stft_image`; the window is a buffer, so ``.to(device)`` moves it."""

    def __init__(self, params: STFTParams) -> None:
        super().__init__()
        self.params = params
        self.register_buffer("window", make_window(params), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, channels, samples) -> (batch, channels, freq, time)."""
        return stft_image(x, self.window, self.params)


@torch.no_grad()
def compute_images(
    x: np.ndarray,
    params: STFTParams,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Images of many windows, computed in batches on ``device``.

    Args:
        x: float32 array (n, channels, samples).

    Returns:
        float32 array (n, channels, height, width).
    """
    module = STFTImage(params).to(device)
    out = None
    starts = range(0, len(x), batch_size)
    for start in tqdm(starts, desc="stft", unit="batch", disable=not progress):
        batch = torch.from_numpy(x[start : start + batch_size]).to(device)
        images = module(batch).float().cpu().numpy()
        if out is None:
            out = np.empty((len(x), *images.shape[1:]), np.float32)
        out[start : start + len(images)] = images
    assert out is not None, "compute_images needs at least one window"
    return out


@dataclass(frozen=True)
class Normalizer:
    """Standardisation statistics fitted on training images only.

    Attributes:
        mode: ``global`` (one mean and std) or ``per_freq`` (one per channel and frequency row).
        mean: array broadcastable to (channels, height, width).
        std: same shape as ``mean``.
    """

    mode: str
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, images: np.ndarray, *, mode: str) -> Normalizer:
        """Fit on (n, channels, height, width) training images."""
        if mode == "global":
            axes: tuple[int, ...] = (0, 1, 2, 3)
        elif mode == "per_freq":
            axes = (0, 3)
        else:
            raise ConfigError(f"features.normalize={mode!r} must be 'global' or 'per_freq'")
        mean = images.mean(axis=axes, dtype=np.float64)
        std = images.std(axis=axes, dtype=np.float64)
        shape = (1, 1, 1) if mode == "global" else (images.shape[1], images.shape[2], 1)
        return cls(
            mode,
            mean.reshape(shape).astype(np.float32),
            np.maximum(std, 1e-6).reshape(shape).astype(np.float32),
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Standardise (n, channels, height, width) images."""
        return (images - self.mean) / self.std

    def to_dict(self) -> dict:
        return {"mode": self.mode, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(d["mode"], np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))
