"""The one path from a signal file to a normalised image, shared by every task.

    file --read--> (channels, samples) at the working rate --cut--> windows
         --STFT--> images --normalise (training statistics)--> the model's input

A :class:`Frontend` holds every setting of that path (rate, reading, windows,
image, normalisation). Training builds it from the configuration and fits its
:class:`~pipeline.features.stft.Normalizer` on the training images; a bundle keeps
it whole, and prediction, adaptation and export rebuild it from there, so a file
is read, cut and imaged the same way, and refused with the same words, wherever it
is used. :func:`batches` groups files into batches of windows for the device, for
training's extraction and prediction alike.

A notebook needs no Hydra::

    front = Frontend(sample_rate=8000, segmenting=Segmenting(4000, 4000, pad=True),
                     params=STFTParams(n_fft=256, hop_length=64, win_length=256))
    windows = front.windows("clip.wav")          # (n, channels, 4000)
    images = front.raw_images(windows)           # (n, channels, height, width), raw
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from pipeline.data.segments import segment
from pipeline.errors import ConfigError, SignalError
from pipeline.features.stft import Normalizer, STFTImage, STFTParams, image_chunks
from pipeline.signals import Signal, read_signal

# The keyword arguments of read_signal that a bundle keeps beside the rate.
READ_KEYS = ("channels", "mat_key", "npz_key", "csv_columns", "channel_axis")

T = TypeVar("T")


@dataclass(frozen=True)
class Segmenting:
    """How files become windows, in samples at the working rate.

    Attributes:
        length: window length.
        hop: distance between window starts.
        pad: zero-pad short signals and a long-enough tail.
    """

    length: int
    hop: int
    pad: bool


def segmenting(
    *,
    sample_rate: int,
    length_seconds: float | None,
    hop_seconds: float | None,
    pad: bool,
    whole_length: int | None = None,
) -> Segmenting:
    """Window settings in seconds turned into samples.

    Args:
        length_seconds: window length (with ``sample_rate=1``, in samples); None
            for whole files, which then need ``whole_length``.
        hop_seconds: distance between windows; None for no overlap.
        whole_length: the length whole files are padded to (the longest file).
    """
    if length_seconds is None:
        assert whole_length is not None
        return Segmenting(whole_length, whole_length, True)
    if not length_seconds > 0:
        raise ConfigError(f"length_seconds={length_seconds} must be positive or null")
    if hop_seconds is not None and not hop_seconds > 0:
        raise ConfigError(f"hop_seconds={hop_seconds} must be positive or null")
    length = max(1, round(length_seconds * sample_rate))
    hop = max(1, round((hop_seconds or length_seconds) * sample_rate))
    return Segmenting(length, hop, pad)


class ShortSignal(SignalError):
    """A file shorter than one window, where short signals are not zero-padded."""


@dataclass(frozen=True)
class Windows:
    """One file's windows.

    Attributes:
        x: float32 (windows, channels, length).
        start: (windows,) start of each window in samples.
        split: (windows,) the region each window came from (see :meth:`Frontend.cut`).
        n_samples: length of the file at the working rate.
        source_rate: the file's own sample rate.
    """

    x: np.ndarray
    start: np.ndarray
    split: np.ndarray
    n_samples: int
    source_rate: int


WINDOW_NORMS = ("window", "global")
# A window whose standard deviation is below this fraction of its peak is constant.
FLAT = 1e-5


@dataclass(frozen=True)
class WindowNorm:
    """Standardisation of raw windows, for the models that take them (``resnet1d``).

    Attributes:
        mode: ``window``: each window's every channel by its own mean and standard
            deviation (z-normalisation, the UCR archive's convention: gain and offset go);
            ``global``: by each channel's mean and standard deviation over the training
            windows (the level stays, which matters where it tells the classes apart).
        mean: (channels, 1) training means (zeros for ``window``).
        std: (channels, 1) training standard deviations (ones for ``window``).
    """

    mode: str
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, windows: np.ndarray, *, mode: str = "window") -> WindowNorm:
        """Fit on training windows (n, channels, samples).

        Raises:
            ConfigError: an unknown mode.
        """
        if mode not in WINDOW_NORMS:
            raise ConfigError(f"raw_normalize={mode!r} must be one of {list(WINDOW_NORMS)}")
        channels = windows.shape[1]
        if mode == "window":
            return cls(
                mode, np.zeros((channels, 1), np.float32), np.ones((channels, 1), np.float32)
            )
        mean = windows.mean(axis=(0, 2), dtype=np.float64)[:, None]
        std = np.maximum(windows.std(axis=(0, 2), dtype=np.float64), 1e-8)[:, None]
        return cls(mode, mean.astype(np.float32), std.astype(np.float32))

    def __call__(self, x: Tensor) -> Tensor:
        """Windows (n, channels, samples) standardised, on their device."""
        if self.mode == "window":
            mean = x.mean(dim=-1, keepdim=True)
            std = x.std(dim=-1, keepdim=True, correction=0)
            # A constant window has a float32 rounding spread of about 1e-7 of its level, not
            # 0: below FLAT of its peak it is flat and standardises to zeros, not to noise.
            flat = std <= FLAT * x.abs().amax(dim=-1, keepdim=True)
            return torch.where(flat, 0.0, (x - mean) / torch.where(flat, 1.0, std))
        mean = torch.as_tensor(self.mean, device=x.device)
        return (x - mean) / torch.as_tensor(self.std, device=x.device)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> WindowNorm:
        return cls(d["mode"], np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


@dataclass(frozen=True)
class Frontend:
    """Every setting from a file to the model's input; a plain object, so reading
    worker processes can run it.

    Attributes:
        sample_rate: the working rate; files at another rate are resampled.
        segmenting: window length, hop and padding in samples.
        params: the image settings.
        read: keyword arguments of :func:`pipeline.signals.read_signal` (channels,
            mat_key, npz_key, csv_columns, channel_axis).
        normalizer: the training images' statistics; None before :meth:`fitted`.
        window_norm: the raw windows' standardisation, for models whose input is the
            window itself (``input == "raw"``); None where no model takes raw windows.
    """

    sample_rate: int
    segmenting: Segmenting
    params: STFTParams
    read: dict = field(default_factory=dict)
    normalizer: Normalizer | None = None
    window_norm: WindowNorm | None = None

    # -- file -> windows -----------------------------------------------------------------

    def signal(self, path: str | Path) -> Signal:
        """The file's samples (channels, n) at the working rate.

        Raises:
            SignalError: naming the file and what is wrong with it.
        """
        return read_signal(path, sample_rate=self.sample_rate, **self.read)

    def cut(
        self, samples: np.ndarray, path: str | Path, *, regions: dict[str, tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows of each [start, stop) region of ``samples`` (channels, n), with their
        starts and the region's name.

        Raises:
            ShortSignal: no region holds one window.
        """
        seg = self.segmenting
        xs, starts, names = [], [], []
        for name, (a, b) in regions.items():
            if b - a <= 0:
                continue
            w = segment(samples[:, a:b], length=seg.length, hop=seg.hop, pad=seg.pad)
            xs.append(w)
            starts.append(a + np.arange(len(w)) * seg.hop)
            names.append(np.full(len(w), name))
        if sum(len(w) for w in xs) == 0:
            raise ShortSignal(
                f"{path}: {samples.shape[-1]} samples is shorter than one window of "
                f"{seg.length} samples"
            )
        return np.concatenate(xs), np.concatenate(starts), np.concatenate(names)

    def windows(
        self,
        path: str | Path,
        *,
        channels: int | None = None,
        regions: Callable[[int], dict[str, tuple[int, int]]] | None = None,
    ) -> Windows:
        """Read ``path`` and cut it into windows.

        Args:
            channels: the channel count the file must have (the model's, or the
                first file's); None for any.
            regions: the file's length -> named [start, stop) sample ranges (the
                time split); None for the whole file as one region, ``"all"``.

        Raises:
            SignalError: the file cannot be read, has another channel count, or is
                shorter than one window.
        """
        sig = self.signal(path)
        n_channels, n = sig.samples.shape
        self.check_channels(path, n_channels, channels)
        spans = regions(n) if regions is not None else {"all": (0, n)}
        x, start, split = self.cut(sig.samples, path, regions=spans)
        return Windows(x, start, split, n, sig.source_rate)

    @staticmethod
    def check_channels(path: str | Path, n_channels: int, channels: int | None) -> None:
        """Raise :class:`SignalError` when a file's ``n_channels`` are not ``channels`` (the
        model's, or the first file's; None for any)."""
        if channels is not None and n_channels != channels:
            raise SignalError(
                f"{path}: has {n_channels} channel(s) where the windows have {channels}; "
                "read the same channels from every file (channels=mix, or channel indices "
                "every file has)"
            )

    # -- windows -> images ---------------------------------------------------------------

    def image_shape(self) -> tuple[int, int]:
        """(height, width) of one window's image."""
        return self.params.image_shape(self.segmenting.length)

    @torch.no_grad()
    def raw_images(
        self,
        windows: np.ndarray | Tensor,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 256,
        module: STFTImage | None = None,
    ) -> Tensor:
        """Images (n, channels, height, width) of windows (n, channels, samples), before
        normalisation, on ``device``; computed ``batch_size`` windows at a time on an
        accelerator and fewer on a CPU (:func:`~pipeline.features.stft.chunk_windows`).

        ``module`` is this front end's :class:`STFTImage` already on ``device``, when
        the caller keeps one across calls.
        """
        module = module if module is not None else STFTImage(self.params).to(device)
        x = torch.as_tensor(windows)
        parts = list(image_chunks(x, module, device=device, batch_size=batch_size))
        if not parts:
            return torch.empty((0, x.shape[1], *self.params.image_shape(x.shape[2])), device=device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def normalise(self, images: Tensor) -> Tensor:
        """Images standardised with the training statistics, on their device.

        Raises:
            ConfigError: the front end is not fitted yet.
        """
        if self.normalizer is None:
            raise ConfigError("this Frontend has no normalizer yet; fit it with fitted(images)")
        return self.normalizer.torch(images)

    def images(
        self,
        windows: np.ndarray,
        *,
        device: torch.device | str = "cpu",
        module: STFTImage | None = None,
    ) -> Tensor:
        """The model's input for windows (n, channels, samples): images, normalised, all
        the windows in one batch on an accelerator (see :meth:`raw_images`)."""
        raw = self.raw_images(
            windows, device=device, batch_size=max(1, len(windows)), module=module
        )
        return self.normalise(raw)

    def fitted(
        self,
        images: np.ndarray,
        *,
        mode: str = "global",
        per_image: bool | str = False,
        per_group: bool | str = False,
    ) -> Frontend:
        """This front end with its normaliser fitted on training images (n, channels, h, w)."""
        normalizer = Normalizer.fit(images, mode=mode, per_image=per_image, per_group=per_group)
        return replace(self, normalizer=normalizer)

    def fitted_windows(self, windows: np.ndarray, *, mode: str = "window") -> Frontend:
        """This front end with its raw-window standardisation fitted on training windows."""
        return replace(self, window_norm=WindowNorm.fit(windows, mode=mode))

    def normalise_windows(self, windows: np.ndarray | Tensor, *, device="cpu") -> Tensor:
        """Raw windows (n, channels, samples) standardised: a raw-input model's input.

        Raises:
            ConfigError: the front end has no window standardisation.
        """
        if self.window_norm is None:
            raise ConfigError("this Frontend has no window_norm; fit it with fitted_windows()")
        return self.window_norm(torch.as_tensor(windows).to(device).float())

    def inputs(
        self, windows: np.ndarray, kind: str, *, device="cpu", module: STFTImage | None = None
    ) -> Tensor:
        """The model's input for windows: ``kind`` ``image`` (normalised images) or ``raw``
        (standardised windows), on ``device``."""
        if kind == "raw":
            return self.normalise_windows(windows, device=device)
        return self.images(windows, device=device, module=module)

    def input_shape(self, kind: str, channels: int) -> tuple[int, ...]:
        """One input's shape: (channels, height, width) or (channels, samples) for ``raw``."""
        if kind == "raw":
            return (channels, self.segmenting.length)
        return (channels, *self.image_shape())

    # -- bundle --------------------------------------------------------------------------

    def data_settings(self) -> dict:
        """What a bundle's ``data`` section keeps of the path: rate, reading, windows."""
        seg = self.segmenting
        return {
            "sample_rate": self.sample_rate,
            **self.read,
            "segment_samples": seg.length,
            "hop_samples": seg.hop,
            "pad": seg.pad,
        }

    @classmethod
    def from_settings(
        cls,
        data: dict,
        params: STFTParams,
        normalizer: Normalizer | None = None,
        window_norm: WindowNorm | None = None,
    ) -> Frontend:
        """The front end of a bundle's sections: ``data`` as :meth:`data_settings` gives it."""
        return cls(
            sample_rate=data["sample_rate"],
            segmenting=Segmenting(data["segment_samples"], data["hop_samples"], data["pad"]),
            params=params,
            read={k: data[k] for k in READ_KEYS if k in data},
            normalizer=normalizer,
            window_norm=window_norm,
        )

    @classmethod
    def from_bundle(cls, bundle) -> Frontend:
        """The front end a :class:`pipeline.bundle.Bundle` was trained with."""
        norm = bundle.meta.get("window_norm")
        window_norm = WindowNorm.from_dict(norm) if norm is not None else None
        return cls.from_settings(bundle.data, bundle.features, bundle.normalizer, window_norm)


def batches(items: Iterable[T], size: int, count: Callable[[T], int]) -> Iterator[list[T]]:
    """Runs of consecutive ``items`` holding at least ``size`` windows (the last may hold
    fewer); ``count`` gives an item's windows (0 for a file that gave none)."""
    run: list[T] = []
    n = 0
    for item in items:
        run.append(item)
        n += count(item)
        if n >= size:
            yield run
            run, n = [], 0
    if run:
        yield run
