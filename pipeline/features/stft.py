"""STFT images: pure functions, a thin module that holds the window, and normalisation.

Every parameter is explicit and carries torchaudio's name; nothing is inherited
from a library default, because torchaudio and librosa disagree on several
(hop ``win_length // 2`` against ``// 4``, padding ``reflect`` against
``constant``) and an unwritten default silently changes the image.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

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
IMAGE_DTYPES = ("float16", "float32")
PAD_MODES = ("reflect", "constant", "replicate", "circular")
MEL_SCALES = ("htk", "slaney")
MEL_NORMS = (None, "slaney")
AUTO = "auto"
# hop_length=auto gives at least this many frames: a short trace keeps a usable time axis.
MIN_FRAMES = 32
# size=auto keeps the native image, shrunk by area averaging to at most this [height, width]
# and never stretched: a 9-row spectrogram stays 9 rows.
AUTO_SIZE_CAP = (64, 64)
# A streaming statistic (Normalizer.fit, group_profiles) reads this many bytes of float32 images
# at a time; its float64 temporaries take about four times as much.
FIT_CHUNK_BYTES = 8 << 20


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
        sample_rate: the working rate in Hz (``data.sample_rate``), needed by ``n_mels`` and
            the frequency range; None only before the data is read.
        n_mels: number of mel bands, or None for the linear frequency axis.
        f_min: lowest frequency of the image in Hz: the mel filterbank's lower edge, or
            with a linear axis the lowest FFT bin kept (a crop).
        f_max: highest frequency in Hz, likewise; None for the Nyquist frequency.
        mel_scale: ``htk`` or ``slaney`` (torchaudio's ``mel_scale``; librosa's ``htk=True``
            is ``htk``).
        norm: mel filter normalisation, torchaudio's ``norm``: None (peak 1) or ``slaney``
            (each filter divided by its width, librosa's default).
        lifter: keep this many cepstral coefficients of each frame's log spectrum and
            return to the frequency axis (cepstral smoothing): the spectral envelope
            (formants, channel) stays and the pitch harmonics go, as MFCCs keep 13 to 20
            coefficients. None leaves the image as it is.

    The fields after ``size`` default to a linear axis over the whole band;
    ``conf/features/*.yaml`` writes them all out.

    Errors name the fields as written here (``n_fft=0``); the task layer renames them
    to config keys (:func:`pipeline.errors.config_keys`).
    """

    n_fft: int
    hop_length: int
    win_length: int
    # The defaults are conf/features/stft.yaml's, written out (never a library's).
    window: str = "hann"
    center: bool = True
    pad_mode: str = "reflect"
    power: float = 2.0
    scale: str = "db"
    top_db: float | None = 80.0
    size: tuple[int, int] | None = None
    sample_rate: int | None = None
    n_mels: int | None = None
    f_min: float = 0.0
    f_max: float | None = None
    mel_scale: str = "htk"
    norm: str | None = None
    lifter: int | None = None
    dtype: str = "float32"  # float16: every value rounded to float16, as the cache stores it

    def __post_init__(self) -> None:
        for key in ("n_fft", "hop_length", "win_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key}={value!r} must be a positive integer", keys=(key,))
        if self.win_length > self.n_fft:
            raise ConfigError(
                f"win_length={self.win_length} must not exceed n_fft={self.n_fft}",
                keys=("win_length", "n_fft"),
            )
        if not isinstance(self.center, bool):
            raise ConfigError(f"center={self.center!r} must be true or false", keys=("center",))
        for key, allowed in (("window", sorted(WINDOWS)), ("pad_mode", list(PAD_MODES))):
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"{key}={getattr(self, key)!r} must be one of {allowed}", keys=(key,)
                )
        if self.power not in (1, 2):
            raise ConfigError(
                f"power={self.power!r} must be 1 (magnitude) or 2 (power)", keys=("power",)
            )
        if self.scale not in SCALES:
            raise ConfigError(
                f"scale={self.scale!r} must be one of {list(SCALES)}", keys=("scale",)
            )
        if self.dtype not in IMAGE_DTYPES:
            raise ConfigError(
                f"dtype={self.dtype!r} must be one of {list(IMAGE_DTYPES)}", keys=("dtype",)
            )
        if self.top_db is not None and not self.top_db > 0:
            raise ConfigError(f"top_db={self.top_db!r} must be positive or null", keys=("top_db",))
        if self.size is not None and (
            len(self.size) != 2 or any(not isinstance(s, int) or s < 1 for s in self.size)
        ):
            raise ConfigError(
                f"size={list(self.size)!r} must be [height, width] in pixels, or null for the "
                "native size",
                keys=("size",),
            )
        self._check_band()
        self._check_lifter()

    def check_fits(self, samples: int, *, chosen: tuple[str, ...] = (), where: str = "windows"):
        """Refuse an STFT window or FFT longer than the windows it transforms.

        Args:
            samples: the window length.
            chosen: the sizes the user set (not ``auto``): the one named when both are too long.
            where: what the windows are, for the message.

        Raises:
            ConfigError: ``n_fft`` or ``win_length`` exceeds ``samples``, naming it and the fix
                (``length_seconds``: the window length of ``segmenting``).
        """
        if self.hop_length > samples:
            raise ConfigError(
                f"hop_length={self.hop_length} is longer than the {samples}-sample {where}, so "
                "every image would have one frame; lower it, or set hop_length=auto",
                keys=("hop_length",),
            )
        long = [k for k in ("n_fft", "win_length") if getattr(self, k) > samples]
        if long and not set(long) & set(chosen):  # auto sizes at their smallest
            raise ConfigError(
                f"the {samples}-sample {where} are shorter than the smallest STFT the automatic "
                f"sizes take ({self.n_fft} samples); lengthen length_seconds or use longer "
                "recordings",
                keys=("length_seconds",),
            )
        if long:
            key = next(k for k in long if k in chosen)
            value = getattr(self, key)
            raise ConfigError(
                f"{key}={value} is longer than the {samples}-sample {where}; lower it to at most "
                f"{samples}, set {key}=auto (sizes that fit the window), or lengthen "
                "length_seconds",
                keys=(key, "length_seconds"),
            )

    def _check_lifter(self) -> None:
        if self.lifter is None:
            return
        if not isinstance(self.lifter, int) or isinstance(self.lifter, bool) or self.lifter < 1:
            raise ConfigError(
                f"lifter={self.lifter!r} must be a positive integer (cepstral coefficients kept, "
                "e.g. 20), or null for no smoothing",
                keys=("lifter",),
            )
        if self.scale not in ("db", "log1p"):
            raise ConfigError(
                f"lifter={self.lifter} smooths a log spectrum, but scale={self.scale!r}; set "
                "scale to db or log1p, or lifter to null",
                keys=("lifter", "scale"),
            )
        if self.sample_rate is None and self.n_mels is None:
            return  # checked again once the data is read: auto sizes and crops need the rate
        if self.lifter >= self.n_freq():
            raise ConfigError(
                f"lifter={self.lifter} keeps every one of the {self.n_freq()} frequency rows, so "
                "it would change nothing; lower it below the image height before resizing, or "
                "set it to null",
                keys=("lifter",),
            )

    def _check_band(self) -> None:
        """Check the mel and frequency-range settings; those that need the rate only with it."""
        if self.n_mels is not None and (
            not isinstance(self.n_mels, int) or isinstance(self.n_mels, bool) or self.n_mels < 1
        ):
            raise ConfigError(
                f"n_mels={self.n_mels!r} must be a positive integer, or null for a linear "
                "frequency axis",
                keys=("n_mels",),
            )
        if self.mel_scale not in MEL_SCALES:
            raise ConfigError(
                f"mel_scale={self.mel_scale!r} must be one of {list(MEL_SCALES)}",
                keys=("mel_scale",),
            )
        if self.norm not in MEL_NORMS:
            raise ConfigError(f"norm={self.norm!r} must be null or 'slaney'", keys=("norm",))
        if not self.f_min >= 0:
            raise ConfigError(f"f_min={self.f_min!r} must be 0 or more (Hz)", keys=("f_min",))
        if self.f_max is not None and not self.f_max > self.f_min:
            raise ConfigError(
                f"f_max={self.f_max!r} must be above f_min={self.f_min!r} (Hz), or null for the "
                "Nyquist frequency",
                keys=("f_max", "f_min"),
            )
        if self.sample_rate is None:
            return
        if not isinstance(self.sample_rate, int) or self.sample_rate < 1:
            raise ConfigError(
                f"sample_rate={self.sample_rate!r} must be a positive integer",
                keys=("sample_rate",),
            )
        self._check_rate_band()

    def _check_rate_band(self) -> None:
        """The frequency range and mel bands fit below the Nyquist frequency and the FFT bins."""
        nyquist = self.sample_rate / 2
        if self.f_max is not None and self.f_max > nyquist:
            raise ConfigError(
                f"f_max={self.f_max!r} is above the Nyquist frequency {nyquist:g} Hz of the "
                f"{self.sample_rate} Hz working rate; lower it or set it to null",
                keys=("f_max",),
            )
        if self.f_min >= nyquist:
            raise ConfigError(
                f"f_min={self.f_min!r} is not below the Nyquist frequency {nyquist:g} Hz of the "
                f"{self.sample_rate} Hz working rate; lower it",
                keys=("f_min",),
            )
        if self.n_mels is None:
            lo, hi = self.bins()
            if hi < lo:
                raise ConfigError(
                    f"f_min={self.f_min!r} to f_max={self.f_max!r} Hz holds no FFT bin (bins are "
                    f"{self.sample_rate / self.n_fft:g} Hz apart at n_fft={self.n_fft}); widen "
                    "the range or raise n_fft",
                    keys=("f_min",),
                )
            return
        empty = int((mel_filters(self).max(dim=0).values == 0).sum())
        if empty:
            raise ConfigError(
                f"n_mels={self.n_mels} is too many for n_fft={self.n_fft} at {self.sample_rate} "
                f"Hz between {self.f_min:g} and {self.top_hz():g} Hz: {empty} mel filter(s) fall "
                "between FFT bins and would be empty; lower n_mels or raise n_fft",
                keys=("n_mels",),
            )

    @property
    def uses_band(self) -> bool:
        """True when the image needs the sample rate: mel bands or a frequency crop."""
        return self.n_mels is not None or self.f_min > 0 or self.f_max is not None

    def top_hz(self) -> float:
        """The image's highest frequency in Hz (``f_max``, or the Nyquist frequency)."""
        assert self.sample_rate is not None, "the frequency range needs sample_rate"
        return self.f_max if self.f_max is not None else self.sample_rate / 2

    def bins(self) -> tuple[int, int]:
        """First and last (inclusive) linear FFT bin kept by ``f_min`` and ``f_max``."""
        n_freqs = self.n_fft // 2 + 1
        if not self.uses_band:
            return 0, n_freqs - 1
        assert self.sample_rate is not None, "the frequency range needs sample_rate"
        hz_per_bin = self.sample_rate / self.n_fft
        # A small tolerance keeps a bin that lies exactly on an edge despite rounding.
        lo = math.ceil(self.f_min / hz_per_bin - 1e-9)
        hi = min(n_freqs - 1, math.floor(self.top_hz() / hz_per_bin + 1e-9))
        return lo, hi

    def n_freq(self) -> int:
        """Image height before resizing: mel bands, or the linear bins kept."""
        if self.n_mels is not None:
            return self.n_mels
        lo, hi = self.bins()
        return hi - lo + 1

    def to_dict(self) -> dict:
        """The settings as JSON-ready values (``size`` as a list)."""
        d = asdict(self)
        d["size"] = list(self.size) if self.size is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> STFTParams:
        """Rebuild from :meth:`to_dict` (``size`` as a list); every field must be there, so
        a saved setting never silently becomes a default.

        Raises:
            ConfigError: a field is missing.
        """
        d = {"dtype": "float32", **d}  # saved before images could be float16
        missing = [k for k in cls.__dataclass_fields__ if k not in d]
        if missing:
            raise ConfigError(f"{missing[0]} is missing (the saved settings hold {sorted(d)})")
        d["size"] = tuple(d["size"]) if d.get("size") else None
        return cls(**d)

    def n_frames(self, n_samples: int) -> int:
        """Number of STFT frames for a signal of ``n_samples``."""
        if self.center:
            return 1 + n_samples // self.hop_length
        return 1 + (n_samples - self.n_fft) // self.hop_length

    def image_shape(self, n_samples: int) -> tuple[int, int]:
        """(height, width) of the image of a signal of ``n_samples``."""
        return self.size if self.size is not None else (self.n_freq(), self.n_frames(n_samples))


def auto_sizes(
    *,
    segment_samples: int,
    sample_rate: int,
    n_fft: int | str,
    hop_length: int | str,
    win_length: int | str,
) -> tuple[int, int, int]:
    """Resolve ``auto`` among ``n_fft``, ``hop_length`` and ``win_length`` for a window length.

    The rules, so that a 150-sample sensor trace and a second of audio both give a
    usable image:

    - ``n_fft``: the largest power of two at most ``segment_samples / 8`` (about 33
      frames at a quarter hop), at most 64 ms at the working rate (a speech or
      machine-sound frame is 20-64 ms) but never capped below 256, then clamped to
      [16, 2048], and at least ``win_length`` when that is fixed;
    - ``win_length``: ``n_fft``;
    - ``hop_length``: ``win_length // 2``, or less where that gives fewer than
      :data:`MIN_FRAMES` frames: the largest hop that gives that many.

    Examples: 150 samples -> 16/4/16 (9 x 38 image); 1 s at 8 kHz -> 512/256/512
    (257 x 32); 1 s at 4 kHz -> 256/128/256 (129 x 32).

    Returns:
        ``(n_fft, hop_length, win_length)`` as integers.
    """
    if n_fft == AUTO:
        n_fft = _pow2_floor(segment_samples / 8)
        n_fft = min(n_fft, max(256, _pow2_floor(0.064 * sample_rate)))
        n_fft = min(2048, max(16, n_fft))
        if isinstance(win_length, int) and win_length > n_fft:
            n_fft = 1 << (win_length - 1).bit_length()
    if win_length == AUTO:
        win_length = n_fft
    if hop_length == AUTO:
        hop_length = max(1, win_length // 2)
        if 1 + segment_samples // hop_length < MIN_FRAMES:
            hop_length = max(1, segment_samples // (MIN_FRAMES - 1))
    return n_fft, hop_length, win_length


def auto_size(params: STFTParams, segment_samples: int) -> tuple[int, int]:
    """``size=auto``: the native (height, width) of a window's image, each at most
    :data:`AUTO_SIZE_CAP`, so a large image is shrunk and a small one never stretched."""
    height, width = params.n_freq(), params.n_frames(segment_samples)
    return min(height, AUTO_SIZE_CAP[0]), min(width, AUTO_SIZE_CAP[1])


def _pow2_floor(x: float) -> int:
    """The largest power of two at most ``x`` (1 for ``x < 2``)."""
    return 1 << max(0, math.floor(math.log2(x))) if x >= 1 else 1


def make_window(params: STFTParams, device: torch.device | str | None = None) -> Tensor:
    """The analysis window, shape (win_length,)."""
    if params.window == "rectangular":
        return torch.ones(params.win_length, device=device)
    return WINDOWS[params.window](params.win_length, periodic=True, device=device)


def mel_filters(params: STFTParams, device: torch.device | str | None = None) -> Tensor:
    """The mel filterbank of ``params``, shape (n_fft // 2 + 1, n_mels).

    torchaudio's :func:`~torchaudio.functional.melscale_fbanks` with every argument
    written out; it matches ``librosa.filters.mel`` with ``htk = mel_scale == "htk"``
    and the same ``norm`` (tested to 1e-4).
    """
    assert params.n_mels is not None and params.sample_rate is not None
    with warnings.catch_warnings():  # empty filters are a ConfigError in STFTParams instead
        warnings.simplefilter("ignore", UserWarning)
        fb = AF.melscale_fbanks(
            n_freqs=params.n_fft // 2 + 1,
            f_min=float(params.f_min),
            f_max=float(params.top_hz()),
            n_mels=params.n_mels,
            sample_rate=params.sample_rate,
            norm=params.norm,
            mel_scale=params.mel_scale,
        )
    return fb.to(device)


def cepstral_smoother(n_freq: int, keep: int, device: torch.device | str | None = None) -> Tensor:
    """The (n_freq, n_freq) matrix that keeps a log spectrum's first ``keep`` cepstral terms.

    With ``D`` the orthonormal DCT-II basis (torchaudio's :func:`create_dct`, the MFCC
    transform), the cepstrum of a column ``s`` is ``D.T @ s``; zeroing every term from
    ``keep`` on and transforming back gives ``D[:, :keep] @ D[:, :keep].T @ s``. The matrix
    is a projection: applying it twice changes nothing.
    """
    basis = AF.create_dct(keep, n_freq, norm="ortho")  # (n_freq, keep)
    return (basis @ basis.T).to(device)


def stft_image(
    x: Tensor,
    window: Tensor,
    params: STFTParams,
    *,
    mel_fb: Tensor | None = None,
    smoother: Tensor | None = None,
) -> Tensor:
    """Time-frequency image of signal windows.

    Order: STFT, ``|.|**power``, mel filterbank or frequency crop, scale, cepstral
    smoothing (``lifter``), resize.

    Args:
        x: Tensor of dimension (..., channels, samples).
        window: Tensor of dimension (win_length,), see :func:`make_window`.
        params: the image settings.
        mel_fb: the filterbank of :func:`mel_filters`, on ``x``'s device; built here
            when ``params.n_mels`` is set and it is not given.
        smoother: the matrix of :func:`cepstral_smoother`, on ``x``'s device; built here
            when ``params.lifter`` is set and it is not given.

    Returns:
        Tensor of dimension (..., channels, freq, time), where freq is
        ``params.n_freq()`` (``n_fft // 2 + 1`` for the full linear axis) and time
        is ``params.n_frames(samples)``, or ``params.size`` when set.
    """
    if not params.center and x.shape[-1] < params.n_fft:
        raise ConfigError(
            f"n_fft={params.n_fft} is longer than the {x.shape[-1]}-sample windows and "
            "center=false; lower n_fft or set center=true",
            keys=("n_fft", "center"),
        )
    spec = AF.spectrogram(
        x,
        pad=0,
        window=window,
        n_fft=params.n_fft,
        hop_length=params.hop_length,
        win_length=params.win_length,
        power=None,
        normalized=False,
        center=params.center,
        pad_mode=params.pad_mode,
        onesided=True,
    ).abs()  # (..., channels, n_fft // 2 + 1, time), magnitude
    if params.power == 2:
        spec.square_()  # in place: torchaudio's abs().pow(2) allocates another image
    spec = _band(spec, params, mel_fb)
    spec = _scale(spec, params)
    if params.lifter is not None:
        if smoother is None:
            smoother = cepstral_smoother(spec.shape[-2], params.lifter, device=spec.device)
        spec = torch.matmul(smoother, spec)  # (F, F) @ (..., F, T): each frame smoothed
    return _sized(spec, params)


def _sized(spec: Tensor, params: STFTParams) -> Tensor:
    """The image resized to ``params.size`` (area averaging) and rounded to ``params.dtype``
    (float16: what the cache stores, so training, predict and export see the same values)."""
    if params.size is not None:
        lead = spec.shape[:-3]
        spec = F.adaptive_avg_pool2d(spec.reshape(-1, *spec.shape[-3:]), params.size)
        spec = spec.reshape(*lead, *spec.shape[-3:])
    if params.dtype == "float16":
        spec = spec.to(torch.float16).to(torch.float32)
    return spec


def _band(spec: Tensor, params: STFTParams, mel_fb: Tensor | None) -> Tensor:
    """(..., channels, n_fft // 2 + 1, time) -> (..., channels, n_freq, time): the mel
    filterbank, or the crop to ``f_min``..``f_max``, or the spectrum as it is."""
    if params.n_mels is not None:
        if mel_fb is None:
            mel_fb = mel_filters(params, device=spec.device)
        # (..., time, freq) @ (freq, n_mels) -> (..., n_mels, time), as torchaudio's MelScale
        return torch.matmul(spec.transpose(-1, -2), mel_fb).transpose(-1, -2)
    if params.uses_band:
        lo, hi = params.bins()
        return spec[..., lo : hi + 1, :]  # (..., channels, n_freq, time)
    return spec


def _scale(spec: Tensor, params: STFTParams) -> Tensor:
    """``params.scale`` applied to (..., channels, freq, time); ``top_db`` floors each item
    over its (channels, freq, time)."""
    if params.scale == "db":
        multiplier = 10.0 if params.power == 2 else 20.0
        lead = spec.shape[:-3]
        return AF.amplitude_to_DB(
            spec.reshape(-1, *spec.shape[-3:]),
            multiplier=multiplier,
            amin=1e-10,
            db_multiplier=0.0,
            top_db=params.top_db,
        ).reshape(*lead, *spec.shape[-3:])
    if params.scale == "log1p":
        return torch.log1p(spec)
    return spec


class STFTImage(nn.Module):
    """Module form of :func:`stft_image`.

    The window and the mel filterbank are buffers, so ``.to(device)`` moves them.
    """

    def __init__(self, params: STFTParams) -> None:
        super().__init__()
        self.params = params
        self.register_buffer("window", make_window(params), persistent=False)
        fb = mel_filters(params) if params.n_mels is not None else None
        self.register_buffer("mel_fb", fb, persistent=False)
        smoother = (
            cepstral_smoother(params.n_freq(), params.lifter) if params.lifter is not None else None
        )
        self.register_buffer("smoother", smoother, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, channels, samples) -> (batch, channels, freq, time)."""
        return stft_image(x, self.window, self.params, mel_fb=self.mel_fb, smoother=self.smoother)


# On a CPU, a chunk's complex spectrum should stay in the processor's cache: 3,000 windows
# of 8,000 samples (n_fft=256, hop 64, magnitude) took 0.14 s in chunks of 2 or 4 MB,
# 0.18 s at 8 MB and 0.28 s in chunks of 256 windows (32 MB) on this project's 2-core
# machine. Of the two fastest, 4 MB makes half as many calls, each of which waits for
# both threads when another process holds a core.
CPU_CHUNK_BYTES = 4 << 20


def chunk_windows(
    params: STFTParams, *, channels: int, samples: int, device: torch.device | str, batch_size: int
) -> int:
    """Windows per STFT call: ``batch_size`` on an accelerator, fewer on a CPU (see above)."""
    if torch.device(device).type != "cpu":
        return batch_size
    frames = params.n_frames(samples) if params.center or samples >= params.n_fft else 1
    complex_bytes = 8 * channels * (params.n_fft // 2 + 1) * frames
    return max(1, min(batch_size, CPU_CHUNK_BYTES // complex_bytes))


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
        batch_size: windows per STFT call on an accelerator; on a CPU at most this
            many, fewer when their spectrum would not fit the cache (:func:`chunk_windows`).

    Returns:
        float32 array (n, channels, height, width).
    """
    n, channels, samples = x.shape
    out = np.empty((n, channels, *params.image_shape(samples)), np.float32)
    chunks = image_chunks(
        torch.from_numpy(x), STFTImage(params).to(device), device=device, batch_size=batch_size
    )
    at = 0
    for images in tqdm(chunks, desc="stft", unit="batch", disable=not progress):
        out[at : at + len(images)] = images.cpu().numpy()
        at += len(images)
    return out


def image_chunks(
    x: Tensor, module: STFTImage, *, device: torch.device | str, batch_size: int
) -> Iterator[Tensor]:
    """The float32 images of windows ``x`` (n, channels, samples) on ``device``, a chunk of
    windows at a time: ``batch_size`` on an accelerator, fewer on a CPU (:func:`chunk_windows`)."""
    n, channels, samples = x.shape
    chunk = chunk_windows(
        module.params, channels=channels, samples=samples, device=device, batch_size=batch_size
    )
    for start in range(0, n, chunk):
        yield module(x[start : start + chunk].to(device)).float()


def finite_images(images: np.ndarray | Tensor) -> np.ndarray:
    """(n,) bool: True where every value of image i of (n, ...) is finite.

    A finite signal can still give a non-finite image: samples of 1e30 (or random
    bytes read as float32) overflow float32 in the power spectrum, and the dB scale
    of an infinite power is NaN. Such an image must never reach a cache, a
    normaliser, a loss or a CSV, so callers drop its file with :func:`overflow_reason`.
    """
    if isinstance(images, Tensor):
        return torch.isfinite(images).flatten(1).all(1).cpu().numpy()
    return np.isfinite(images).reshape(len(images), -1).all(1)


def overflow_reason(path, windows: np.ndarray) -> str:
    """Why ``path``, whose ``windows`` gave a non-finite image, is skipped."""
    peak = float(np.abs(windows).max(initial=0.0))
    return (
        f"{path}: its STFT image is not finite: samples reach {peak:.3g} in magnitude and "
        "the power spectrum overflows float32; rescale the signal (to volts, or to [-1, 1]) "
        "or remove the file"
    )


@dataclass(frozen=True)
class Normalizer:
    """Standardisation statistics fitted on training images only.

    Attributes:
        mode: ``global`` (one mean and std) or ``per_freq`` (one per channel and frequency row).
        mean: array broadcastable to (channels, height, width).
        std: same shape as ``mean``.
        per_image: first standardise every image by its own statistics
            (``features.per_image``). ``True``: its mean and standard deviation; on a dB
            scale a louder or quieter recording then gives the same image, which helps
            across speakers, microphones and sensors. ``"freq"``: each frequency row's
            mean over time is removed (cepstral mean normalisation: a fixed channel or
            microphone response is a constant per row in dB), then the image's standard
            deviation divides. ``False``: neither.
        per_group: ``"freq"`` (``features.per_group``): after standardising, remove from
            every image the mean frequency profile of its group (speaker, microphone,
            machine), taken over all that group's images and time (:func:`group_profiles`,
            applied by :func:`pipeline.features.view.centred_by_group`). A group's own
            images give its profile, test groups' included (they need no labels), as
            per-speaker cepstral mean normalisation does in speech recognition: what a
            speaker's voice and microphone add to every recording goes, what differs
            between the classes stays, provided each group holds a mix of classes. ``False``: off.
    """

    mode: str
    mean: np.ndarray
    std: np.ndarray
    per_image: bool | str = False
    per_group: bool | str = False

    @classmethod
    def fit(
        cls,
        images: np.ndarray,
        *,
        mode: str,
        per_image: bool | str = False,
        per_group: bool | str = False,
    ) -> Normalizer:
        """Fit on (n, channels, height, width) training images: an array, or anything that
        slices by rows into arrays or tensors (an :class:`~pipeline.features.store.ImageFile`,
        an :class:`~pipeline.features.view.ImageView`), read :data:`FIT_CHUNK_BYTES` at a
        time and their moments merged exactly (:func:`merge_moments`)."""
        if per_image not in (True, False, "freq"):
            raise ConfigError(
                f"per_image={per_image!r} must be false, true (each image by its own mean and "
                "std) or freq (each frequency row's mean removed)",
                keys=("per_image",),
            )
        check_per_group(per_group)
        per_group = per_group or False
        if mode == "global":
            axes: tuple[int, ...] = (0, 1, 2, 3)
        elif mode == "per_freq":
            axes = (0, 3)
        else:
            raise ConfigError(f"mode={mode!r} must be 'global' or 'per_freq'", keys=("mode",))
        moments, step = None, chunk_rows(images)
        for i in range(0, len(images), step):
            x = np.asarray(images[i : i + step], dtype=np.float32)
            if per_image:
                x = _standardise_each(x, per_image)
            moments = merge_moments(moments, _moments(x, axes))
        count, mean, m2 = moments
        shape = (1, 1, 1) if mode == "global" else (images.shape[1], images.shape[2], 1)
        return cls(
            mode,
            mean.reshape(shape).astype(np.float32),
            np.maximum(np.sqrt(m2 / count), 1e-6).reshape(shape).astype(np.float32),
            per_image,
            per_group,
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Standardise (n, channels, height, width) images."""
        if self.per_image:
            images = _standardise_each(images, self.per_image)
        return (images - self.mean) / self.std

    def torch(self, images: Tensor) -> Tensor:
        """The same on a tensor, on its device."""
        if self.per_image:
            images = _standardise_each(images, self.per_image)
        mean = torch.as_tensor(self.mean, device=images.device)
        std = torch.as_tensor(self.std, device=images.device)
        return (images - mean) / std

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "per_image": self.per_image,
            "per_group": self.per_group,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(
            d["mode"],
            np.asarray(d["mean"], np.float32),
            np.asarray(d["std"], np.float32),
            d["per_image"],
            d["per_group"],
        )


def chunk_rows(images) -> int:
    """Images per read of a streaming statistic: :data:`FIT_CHUNK_BYTES` of float32, at least 1."""
    return max(1, FIT_CHUNK_BYTES // (4 * math.prod(images.shape[1:])))


def _moments(x: np.ndarray, axes: tuple[int, ...]) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, sum of squared deviations) of ``x`` over ``axes``, in float64."""
    count = math.prod(x.shape[a] for a in axes)
    mean = x.mean(axis=axes, dtype=np.float64, keepdims=True)
    m2 = np.square(x - mean, dtype=np.float64).sum(axis=axes, keepdims=True)
    return count, mean, m2


def merge_moments(a, b):
    """Two parts' (count, mean, sum of squared deviations) merged into the whole's, exactly
    (Chan, Golub and LeVeque's pairwise update); ``a`` may be None (nothing yet)."""
    if a is None:
        return b
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta**2 * (na * nb / n)


def check_per_group(value) -> None:
    """``per_group`` (of :meth:`Normalizer.fit`) is false (or null) or freq."""
    if value not in (False, None, "freq"):
        raise ConfigError(
            f"per_group={value!r} must be false or freq (each group's mean frequency profile "
            "removed from its images)",
            keys=("per_group",),
        )


def group_profiles(images, groups: np.ndarray) -> dict:
    """Each group's mean frequency profile: {group: (channels, height, 1)} over its images and time.

    Args:
        images: normalised images (n, channels, height, width): an array, or anything that
            slices by rows into arrays or tensors (read :data:`FIT_CHUNK_BYTES` at a time).
        groups: the group of each image (n,), any hashable values.
    """
    names, index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    sums, step = np.zeros((len(names), *images.shape[1:3])), chunk_rows(images)
    for i in range(0, len(images), step):
        rows = np.asarray(images[i : i + step]).mean(axis=3, dtype=np.float64)
        np.add.at(sums, index[i : i + step], rows)  # (n, channels, height) per group
    counts = np.bincount(index, minlength=len(names))
    return {
        name: (sums[i] / counts[i])[..., None].astype(np.float32)
        for i, name in enumerate(names.tolist())
    }


def _standardise_each(images, how: bool | str = True):
    """Each image (n, channels, height, width) minus its mean (per row for ``"freq"``),
    over its standard deviation after that."""
    axes = (1, 2, 3)
    mean_axes = (3,) if how == "freq" else axes
    if isinstance(images, Tensor):
        centred = images - images.mean(dim=mean_axes, keepdim=True)
        std = centred.pow(2).mean(dim=axes, keepdim=True).sqrt()
        return centred / std.clamp(min=1e-6)
    centred = images - images.mean(axis=mean_axes, keepdims=True, dtype=np.float64)
    std = np.sqrt((centred**2).mean(axis=axes, keepdims=True))
    return (centred / np.maximum(std, 1e-6)).astype(np.float32)
