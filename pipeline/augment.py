"""Augmentation of normalised spectrogram batches during training (off by default).

SpecAugment's frequency and time masking (Park et al. 2019) through torchaudio's
transforms, a random circular shift along time, random stretching of the frequency
axis (in the spirit of vocal tract length perturbation, Jaitly & Hinton 2013) and of
the time axis (speaking rate), a random channel response (a smooth curve added along
frequency, as a different microphone or mounting adds its own gain per band to a
log spectrogram), and mixup (Zhang et al. 2018).
Masks are filled with 0, the training mean after normalisation. Random numbers
come from torch's global generator, which :func:`pipeline.fit.fit` seeds per
rank and stores in its checkpoints, so a resumed run draws the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio.transforms as T
from torch import Tensor, nn

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class AugmentSettings:
    """The ``train.augment`` group.

    Attributes:
        freq_mask: widest frequency mask in image rows (0: off); one mask per image.
        time_mask: widest time mask in image columns (0: off); one mask per image.
        time_shift: largest circular shift along time, as a fraction of the width (0: off).
        freq_warp: largest stretch of the frequency axis: each image is scaled by its own
            factor in [1 - f, 1 + f], anchored at the lowest row (0: off; 0.1 is mild).
        time_stretch: the same along time, anchored at the first column (0: off).
        channel: largest amplitude of the first term of a random smooth curve added
            along frequency (the same for every column), in units of the normalised image
            (0: off; on a log-mel image whose standard deviation is 15 dB, 0.5 tilts it by
            up to +-7.5 dB and the three terms together reach +-14 dB). Not with
            ``features.per_image=freq``, which removes every row's mean from the test
            images, so they never carry such a curve.
        mixup: alpha of the Beta(alpha, alpha) mixing weight (0: off; 0.2 is common).
    """

    freq_mask: int = 0
    time_mask: int = 0
    time_shift: float = 0.0
    freq_warp: float = 0.0
    time_stretch: float = 0.0
    channel: float = 0.0
    mixup: float = 0.0

    def __post_init__(self) -> None:
        for key in ("freq_mask", "time_mask"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    f"train.augment.{key}={value!r} must be a whole number of image rows or "
                    "columns, 0 to turn it off"
                )
        if not 0 <= self.time_shift <= 1:
            raise ConfigError(
                f"train.augment.time_shift={self.time_shift!r} must be a fraction in [0, 1]"
            )
        for key in ("freq_warp", "time_stretch"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise ConfigError(
                    f"train.augment.{key}={value!r} must be a fraction in [0, 1), e.g. 0.1 "
                    "for factors between 0.9 and 1.1"
                )
        if not self.channel >= 0:
            raise ConfigError(
                f"train.augment.channel={self.channel!r} must be 0 (off) or a positive "
                "amplitude in normalised units, e.g. 0.5"
            )
        if not self.mixup >= 0:
            raise ConfigError(f"train.augment.mixup={self.mixup!r} must be 0 (off) or positive")

    @property
    def any_image(self) -> bool:
        """Whether any per-image transform (masking, shift) is on."""
        return bool(
            self.freq_mask
            or self.time_mask
            or self.time_shift
            or self.freq_warp
            or self.time_stretch
            or self.channel
        )


class SpecAugment(nn.Module):
    """Per-image masking and time shift of a batch (batch, channels, freq, time); of raw
    windows (batch, channels, samples) only the time shift, the rest needing a frequency axis."""

    def __init__(self, s: AugmentSettings) -> None:
        super().__init__()
        self.s = s
        self.freq = T.FrequencyMasking(s.freq_mask, iid_masks=True) if s.freq_mask else None
        self.time = T.TimeMasking(s.time_mask, iid_masks=True) if s.time_mask else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # raw windows (batch, channels, samples): no frequency axis
            return time_shift(x, self.s.time_shift) if self.s.time_shift else x
        if self.s.freq_warp or self.s.time_stretch:
            x = stretch(x, freq=self.s.freq_warp, time=self.s.time_stretch)
        if self.s.channel:
            x = channel_response(x, self.s.channel)
        if self.s.time_shift:
            x = time_shift(x, self.s.time_shift)
        if self.freq is not None:
            x = self.freq(x)
        if self.time is not None:
            x = self.time(x)
        return x


def time_shift(x: Tensor, fraction: float) -> Tensor:
    """Roll each image (or raw window) along time, its last axis, by its own random number of
    columns (samples) in [-f·W, f·W]."""
    width = x.shape[-1]
    most = int(fraction * width)
    if most == 0:
        return x
    shift = torch.randint(-most, most + 1, (x.shape[0],), device=x.device)
    cols = (torch.arange(width, device=x.device)[None, :] - shift[:, None]) % width
    index = cols.view(x.shape[0], *([1] * (x.dim() - 2)), width).expand_as(x)
    return torch.gather(x, -1, index)


def channel_response(x: Tensor, amplitude: float, terms: int = 3) -> Tensor:
    """Add to each image its own smooth random curve along frequency.

    The curve is ``sum_k a_k cos(pi k f)`` over ``f`` in [0, 1] from the lowest row to
    the highest, ``k = 1..terms``, with ``a_k`` uniform in [-amplitude / k, amplitude / k]:
    tilts and broad bumps, as channels and microphones make, with no overall offset
    (a gain, which ``features.per_image`` removes from every image). Every column gets the
    same curve, as a fixed channel adds the same gain per band at every instant.
    """
    n, rows = x.shape[0], x.shape[-2]
    k = torch.arange(1, terms + 1, device=x.device, dtype=x.dtype)
    a = amplitude * (2 * torch.rand(n, terms, device=x.device, dtype=x.dtype) - 1) / k
    f = torch.linspace(0, 1, rows, device=x.device, dtype=x.dtype)
    curve = a @ torch.cos(torch.pi * k[:, None] * f[None, :])  # (n, rows)
    return x + curve[:, None, :, None]


def stretch(x: Tensor, *, freq: float, time: float) -> Tensor:
    """Scale each image along frequency and time by its own factors in [1 - f, 1 + f].

    The lowest frequency row and the first time column stay in place; a factor above 1
    moves content up (higher frequencies, later), below 1 down, and rows or columns
    that fall outside repeat the edge. Bilinear interpolation.
    """
    n = x.shape[0]
    ones = torch.ones(n, device=x.device)

    def factor(most: float) -> Tensor:
        return ones if not most else 1 + most * (2 * torch.rand(n, device=x.device) - 1)

    ft, ff = factor(time), factor(freq)
    # affine_grid maps output to input coordinates in [-1, 1]: x_in = x_out / a + (1 / a - 1)
    # keeps -1 (the first column, the lowest row) fixed.
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = 1 / ft, 1 / ft - 1
    theta[:, 1, 1], theta[:, 1, 2] = 1 / ff, 1 / ff - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def mixup(x: Tensor, y: Tensor, alpha: float) -> tuple[Tensor, Tensor, float]:
    """Mix each image with another of the batch.

    Returns:
        The mixed images, the other image's labels and the weight of the first:
        the loss is ``lam * CE(logits, y) + (1 - lam) * CE(logits, y_other)``.
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    return lam * x + (1 - lam) * x[perm], y[perm], lam
