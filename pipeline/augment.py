"""Augmentation of normalised spectrogram batches during training (off by default).

SpecAugment's frequency and time masking (Park et al. 2019) through torchaudio's
transforms, a random circular shift along time, and mixup (Zhang et al. 2018).
Masks are filled with 0, the training mean after normalisation. Random numbers
come from torch's global generator, which :func:`pipeline.fit.fit` seeds per
rank and stores in its checkpoints, so a resumed run draws the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
        mixup: alpha of the Beta(alpha, alpha) mixing weight (0: off; 0.2 is common).
    """

    freq_mask: int = 0
    time_mask: int = 0
    time_shift: float = 0.0
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
        if not self.mixup >= 0:
            raise ConfigError(f"train.augment.mixup={self.mixup!r} must be 0 (off) or positive")

    @property
    def any_image(self) -> bool:
        """Whether any per-image transform (masking, shift) is on."""
        return bool(self.freq_mask or self.time_mask or self.time_shift)


class SpecAugment(nn.Module):
    """Per-image masking and time shift of a batch (batch, channels, freq, time)."""

    def __init__(self, s: AugmentSettings) -> None:
        super().__init__()
        self.s = s
        self.freq = T.FrequencyMasking(s.freq_mask, iid_masks=True) if s.freq_mask else None
        self.time = T.TimeMasking(s.time_mask, iid_masks=True) if s.time_mask else None

    def forward(self, x: Tensor) -> Tensor:
        if self.s.time_shift:
            x = time_shift(x, self.s.time_shift)
        if self.freq is not None:
            x = self.freq(x)
        if self.time is not None:
            x = self.time(x)
        return x


def time_shift(x: Tensor, fraction: float) -> Tensor:
    """Roll each image along time by its own random number of columns in [-f·W, f·W]."""
    width = x.shape[-1]
    most = int(fraction * width)
    if most == 0:
        return x
    shift = torch.randint(-most, most + 1, (x.shape[0],), device=x.device)
    cols = (torch.arange(width, device=x.device)[None, :] - shift[:, None]) % width
    index = cols[:, None, None, :].expand_as(x)
    return torch.gather(x, -1, index)


def mixup(x: Tensor, y: Tensor, alpha: float) -> tuple[Tensor, Tensor, float]:
    """Mix each image with another of the batch.

    Returns:
        The mixed images, the other image's labels and the weight of the first:
        the loss is ``lam * CE(logits, y) + (1 - lam) * CE(logits, y_other)``.
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    return lam * x + (1 - lam) * x[perm], y[perm], lam
