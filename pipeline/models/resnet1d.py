"""The 1-D ResNet of Wang, Yan and Oates (2017) on the raw window: the image-free baseline.

"Time series classification from scratch with deep neural networks: a strong
baseline" (IJCNN 2017), as Fawaz et al. (2019) reproduced it on the UCR archive:
three residual blocks of three convolutions (kernels 8, 5 and 3, "same" padding),
64, 128 and 128 filters, each convolution followed by batch norm and the first two
by ReLU; the block's shortcut is a 1x1 convolution with batch norm where the
channel count changes and batch norm alone where it does not; the sum goes through
ReLU. Global average pooling over time and a linear layer give the logits.

The convolutions carry no bias: the batch norm after each one has its own shift,
so a bias would be a redundant parameter (Keras' reference adds one; the function
is the same). Its input is the front end's normalised raw window, (batch,
channels, samples): if it beats the ResNet on STFT images, the image was the wrong
front end for those signals.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.values import is_whole


class Block1d(nn.Module):
    """Three convolutions with batch norm, and a shortcut (projected where channels change)."""

    def __init__(self, in_channels: int, filters: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        convs, norms = [], []
        for i, k in enumerate(kernels):
            convs.append(nn.Conv1d(in_channels if i == 0 else filters, filters, k, bias=False))
            norms.append(nn.BatchNorm1d(filters))
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
        self.kernels = tuple(kernels)
        project = in_channels != filters
        self.shortcut = nn.Sequential(
            *([nn.Conv1d(in_channels, filters, 1, bias=False)] if project else []),
            nn.BatchNorm1d(filters),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = x
        last = len(self.convs) - 1
        for i, (conv, norm, k) in enumerate(zip(self.convs, self.norms, self.kernels, strict=True)):
            # "same" padding of an even kernel puts the extra sample on the right, as Keras does
            out = norm(conv(F.pad(out, ((k - 1) // 2, k // 2))))
            if i < last:
                out = F.relu(out)
        return F.relu(out + self.shortcut(x))


class ResNet1d(nn.Module):
    """Wang et al.'s 1-D ResNet: (batch, channels, samples) -> logits (batch, classes).

    Attributes:
        input_kind: ``"raw"``: the model takes the normalised windows, not images.
        config: the keyword arguments of :func:`build_resnet1d`, for the bundle.
    """

    input_kind = "raw"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        filters: tuple[int, ...],
        kernels: tuple[int, ...],
    ) -> None:
        super().__init__()
        blocks, channels = [], in_channels
        for f in filters:
            blocks.append(Block1d(channels, f, kernels))
            channels = f
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)
        self.config = {
            "network": "resnet1d",
            "num_classes": num_classes,
            "in_channels": in_channels,
            "filters": list(filters),
            "kernels": list(kernels),
        }

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(x).mean(dim=-1))


def build_resnet1d(
    *,
    num_classes: int,
    in_channels: int = 1,
    filters: tuple[int, ...] | list[int] = (64, 128, 128),
    kernels: tuple[int, ...] | list[int] = (8, 5, 3),
    network: str = "resnet1d",
) -> ResNet1d:
    """Wang et al.'s 1-D ResNet; the defaults are the paper's.

    Args:
        filters: each residual block's filter count (the paper: 64, 128, 128).
        kernels: the kernel sizes of a block's convolutions (the paper: 8, 5, 3).
        network: ``resnet1d``, as the bundle's model_config records it.

    Raises:
        ConfigError: a setting outside its rule, naming it.
    """
    for key, value in (("filters", filters), ("kernels", kernels)):
        values = list(value) if isinstance(value, list | tuple) else None
        if not values or not all(is_whole(v, minimum=1) for v in values):
            raise ConfigError(f"{key}={value!r} must be a non-empty list of positive integers")
    if network != "resnet1d":
        raise ConfigError(f"network={network!r} must be resnet1d")
    return ResNet1d(num_classes, in_channels, tuple(filters), tuple(kernels))
