"""ResNet and its plain twin for spectrogram images.

Follows "Deep Residual Learning for Image Recognition" (He et al., 2015,
https://arxiv.org/abs/1512.03385), laid out like torchvision's ``resnet.py``:
conv helpers, blocks, shortcut modules, the network, then builders.

Two forms of the paper are available:

* ``arch="cifar"`` (paper section 4.2): depth ``6n + 2``, basic blocks, three
  stages of 16/32/64 channels, a 3x3 stride-1 stem and no max pool.
* ``arch="resnet18" ... "resnet152"`` (paper table 1): four stages of
  64/128/256/512 channels (times 4 for bottleneck blocks), with either the
  paper's 7x7 stride-2 stem and max pool (``stem="imagenet"``) or a 3x3
  stride-1 stem without max pool (``stem="small"``), which keeps the few
  pixels of a small one-channel spectrogram.

``residual=False`` builds the plain twin: the same convolutions, batch norms,
widths and strides with no shortcut at all, so residual against plain is a
controlled comparison (paper section 4.1).

``drop_path=p`` adds stochastic depth (Huang et al., 2016, "Deep Networks with
Stochastic Depth", https://arxiv.org/abs/1603.09382): in training, each block's
residual branch is dropped for a whole sample with a probability rising
linearly from ``p / L`` in the first of ``L`` blocks to ``p`` in the last, so
that sample passes through the shortcut alone. It needs shortcuts; the plain
twin has nothing to fall back to.

Inputs are images of shape (N, in_channels, H, W) for any H, W >= 1 (for an
STFT image, H is frequency and W is time); a global average pool makes the
output logits (N, num_classes) independent of the image size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pipeline.errors import ConfigError

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "DropPath",
    "ResNet",
    "build_resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet1202",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]

SHORTCUTS = ("A", "B", "C")
STEMS = ("imagenet", "small")
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1; maps (H, W) to (ceil(H / stride), ceil(W / stride))."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution; maps (H, W) to (ceil(H / stride), ceil(W / stride))."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: identity, subsampled and zero-padded where dimensions grow.

    Has no parameters, so a network with option A has exactly as many
    parameters as its plain twin.

    Args:
        in_planes: Channels of the block input.
        out_planes: Channels of the block output; at least ``in_planes``.
        stride: Spatial subsampling of the block.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        assert out_planes >= in_planes, "option A can only add channels"
        self.extra_planes = out_planes - in_planes
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        # (N, C_in, H, W) -> (N, C_in, ceil(H / s), ceil(W / s)): the same size as
        # the stride-s convolutions with padding 1 (3x3) or 0 (1x1) on the other path.
        x = x[:, :, :: self.stride, :: self.stride]
        # (N, C_in, H', W') -> (N, C_out, H', W'): new channels are zeros.
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_planes))


class ProjectionShortcut(nn.Module):
    """Option B/C shortcut: a strided 1x1 convolution followed by batch norm.

    Args:
        in_planes: Channels of the block input.
        out_planes: Channels of the block output.
        stride: Spatial subsampling of the block.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.conv = conv1x1(in_planes, out_planes, stride)
        self.bn = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))  # (N, C_out, ceil(H / s), ceil(W / s))


class DropPath(nn.Module):
    """Drop a residual branch for whole samples in training (stochastic depth).

    Each sample's branch is zeroed with probability ``p`` and the survivors are
    scaled by ``1 / (1 - p)``, so the expected output is the branch itself and
    evaluation needs no rescaling (torchvision's ``StochasticDepth``, "row"
    mode). In evaluation mode, or with ``p = 0``, it is the identity.

    Args:
        p: Probability of dropping a sample's branch, in [0, 1).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        # (N, 1, 1, 1): one draw per sample, broadcast over channels and pixels.
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * mask.bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (paper figure 2, left of figure 5).

    Args:
        in_planes: Channels of the input.
        planes: Channels of both convolutions and of the output.
        stride: Stride of the first convolution.
        shortcut: The shortcut path, or ``None`` for the plain twin.
        drop_path: Probability of dropping the residual branch of a sample in
            training (stochastic depth); needs a shortcut.
    """

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: nn.Module | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)  # (N, planes, ceil(H / s), ceil(W / s))
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.shortcut is not None:  # None: the plain twin adds nothing
            identity = self.shortcut(x)  # (N, planes, ceil(H / s), ceil(W / s))
            out = self.drop_path(out) + identity
        out = self.relu(out)  # ReLU after the addition, as in the paper
        return out


class Bottleneck(nn.Module):
    """1x1, 3x3, 1x1 convolutions with expansion 4 (paper figure 5, right).

    The stride sits on the 3x3 convolution, as in torchvision ("ResNet v1.5");
    the paper puts it on the first 1x1 convolution, which discards three
    quarters of the input before any 3x3 filter sees it. Parameter counts are
    the same either way.

    Args:
        in_planes: Channels of the input.
        planes: Channels of the 1x1 and 3x3 convolutions; the output has
            ``planes * 4``.
        stride: Stride of the 3x3 convolution.
        shortcut: The shortcut path, or ``None`` for the plain twin.
        drop_path: Probability of dropping the residual branch of a sample in
            training (stochastic depth); needs a shortcut.
    """

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: nn.Module | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)  # (N, planes, H, W)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)  # (N, planes, ceil(H / s), ceil(W / s))
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)  # (N, 4 * planes, ceil(H / s), ceil(W / s))
        out = self.bn3(out)
        if self.shortcut is not None:  # None: the plain twin adds nothing
            identity = self.shortcut(x)  # (N, 4 * planes, ceil(H / s), ceil(W / s))
            out = self.drop_path(out) + identity
        out = self.relu(out)  # ReLU after the addition, as in the paper
        return out


def _init_weights(m: nn.Module, generator: torch.Generator) -> None:
    """He initialisation for convolutions (paper section 3.4), BN as identity."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.Linear):
        # PyTorch's own default for nn.Linear, drawn from the private generator.
        nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(m.in_features)
        nn.init.uniform_(m.bias, -bound, bound, generator=generator)


def _check_options(
    *, stem: str, shortcut: str, residual: bool, zero_init_residual: bool, drop_path: float
) -> None:
    """Refuses the :class:`ResNet` options that are unknown or contradict each other."""
    if stem not in STEMS:
        raise ConfigError(f"stem={stem!r} must be one of 'imagenet', 'small'")
    if shortcut not in SHORTCUTS:
        raise ConfigError(f"shortcut={shortcut!r} must be one of 'A', 'B', 'C'")
    if zero_init_residual and not residual:
        raise ConfigError(
            "zero_init_residual=True needs residual=True: the plain twin has no shortcut, "
            "so zeroing the last batch norm of every block would zero the whole network; "
            "set zero_init_residual=False"
        )
    if isinstance(drop_path, bool) or not isinstance(drop_path, int | float):
        raise ConfigError(f"drop_path={drop_path!r} must be a number in [0, 1), e.g. 0.2")
    if not 0.0 <= drop_path < 1.0:
        raise ConfigError(
            f"drop_path={drop_path!r} must be in [0, 1): it is the probability of dropping "
            "the last block's residual branch; 0.1 to 0.5 are usual"
        )
    if drop_path > 0 and not residual:
        raise ConfigError(
            f"drop_path={drop_path!r} needs residual=True: stochastic depth drops a block's "
            "residual branch and keeps its shortcut, and the plain twin has none; "
            "set drop_path=0"
        )


class ResNet(nn.Module):
    """A residual network, or its plain twin, for images of any size.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: Number of blocks per stage, e.g. ``[3, 3, 3]`` for ResNet-20.
        widths: Channels (``planes``) per stage, e.g. ``[16, 32, 64]``; the
            stem outputs ``widths[0]`` channels, the first stage has stride 1
            and every later one stride 2.
        num_classes: Number of output logits.
        in_channels: Channels of the input image (1 for a mono spectrogram).
        stem: ``"imagenet"`` (7x7 stride-2 convolution and 3x3 stride-2 max
            pool, a quarter of the resolution) or ``"small"`` (3x3 stride-1
            convolution, no pool).
        shortcut: ``"A"`` zero-padding identity, ``"B"`` projection where the
            dimensions change and identity elsewhere, ``"C"`` projection on
            every block (paper section 4.1); the paper uses A on CIFAR and B on
            ImageNet.
        residual: ``False`` removes every shortcut (the plain twin).
        zero_init_residual: Start each residual branch at zero; needs
            ``residual=True``.
        drop_path: Stochastic depth: the probability of dropping the last
            block's residual branch for a sample in training; block ``l`` of
            ``L`` drops with ``drop_path * l / L`` (Huang et al.'s linear
            rule). Needs ``residual=True``; 0 turns it off.

    Attributes:
        config: The keyword arguments of :func:`build_resnet` that rebuild this
            network (JSON-serialisable); set by :func:`build_resnet`, ``None``
            for a network built directly from this class.

    Raises:
        ConfigError: (a ``ValueError``) for an unknown ``stem`` or ``shortcut``,
            ``zero_init_residual=True`` or ``drop_path > 0`` with
            ``residual=False``, or ``drop_path`` outside [0, 1).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        widths: list[int],
        *,
        num_classes: int,
        in_channels: int = 1,
        stem: str = "small",
        shortcut: str = "B",
        residual: bool = True,
        zero_init_residual: bool = False,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        _check_options(
            stem=stem,
            shortcut=shortcut,
            residual=residual,
            zero_init_residual=zero_init_residual,
            drop_path=drop_path,
        )
        self.config: dict | None = None
        self.shortcut_kind = shortcut
        self.residual = residual
        self.in_planes = widths[0]
        # One draw from the global generator seeds a private one, drawn before any
        # module is built: after the same torch.manual_seed, the residual network
        # (any shortcut option) and its plain twin start from the same weights.
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))

        self.stem = self._make_stem(stem, in_channels, widths[0])
        # Stochastic depth's linear rule: block l of L (counted over all stages) drops its
        # residual branch with probability drop_path * l / L.
        drops = (drop_path * (i + 1) / sum(layers) for i in range(sum(layers)))
        self.layers = nn.Sequential(
            *[
                self._make_layer(block, planes, blocks, stride=1 if i == 0 else 2, drops=drops)
                for i, (planes, blocks) in enumerate(zip(widths, layers, strict=True))
            ]
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        self._init_weights(generator, zero_init_residual=zero_init_residual)

    def _init_weights(self, generator: torch.Generator, *, zero_init_residual: bool) -> None:
        """Initialise every module from ``generator``, the twins' shared layers first."""
        # Projection shortcuts last, so the layers both twins have get the same draws.
        shortcuts = [m for m in self.modules() if isinstance(m, ProjectionShortcut)]
        in_shortcut = {id(m) for proj in shortcuts for m in proj.modules()}
        shared = [m for m in self.modules() if id(m) not in in_shortcut]
        for m in shared + [m for proj in shortcuts for m in proj.modules()]:
            _init_weights(m, generator)
        if zero_init_residual:
            # Each residual branch starts at zero, so each block starts as the
            # identity; this helps large-batch training (Goyal et al. 2017,
            # "Accurate, Large Minibatch SGD", https://arxiv.org/abs/1706.02677).
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    @staticmethod
    def _make_stem(stem: str, in_channels: int, planes: int) -> nn.Sequential:
        if stem == "imagenet":
            return nn.Sequential(
                nn.Conv2d(in_channels, planes, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        return nn.Sequential(
            conv3x3(in_channels, planes), nn.BatchNorm2d(planes), nn.ReLU(inplace=True)
        )

    def _shortcut(self, in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
        """The one place that decides what a block's shortcut is."""
        if not self.residual:
            return None
        changes = stride != 1 or in_planes != out_planes
        if self.shortcut_kind == "C" or (self.shortcut_kind == "B" and changes):
            return ProjectionShortcut(in_planes, out_planes, stride)
        if self.shortcut_kind == "A" and changes:
            return ZeroPadShortcut(in_planes, out_planes, stride)
        return nn.Identity()

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        blocks: int,
        stride: int,
        drops: Iterator[float],
    ) -> nn.Sequential:
        """One stage; ``drops`` yields each block's stochastic-depth probability in turn."""
        out_planes = planes * block.expansion
        stage = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            shortcut = self._shortcut(self.in_planes, out_planes, s)
            stage.append(block(self.in_planes, planes, s, shortcut, drop_path=next(drops)))
            self.in_planes = out_planes
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of images.

        Args:
            x: Images of shape (N, in_channels, H, W).

        Returns:
            Logits of shape (N, num_classes).
        """
        x = self.stem(x)  # (N, widths[0], H0, W0): H0 = H ("small") or ceil(H / 4) ("imagenet")
        x = self.layers(x)  # (N, widths[-1] * expansion, H0 / 2**(stages-1), ...) rounded up
        x = self.avgpool(x)  # (N, C, 1, 1)
        x = torch.flatten(x, 1)  # (N, C)
        return self.fc(x)  # (N, num_classes)


# arch -> (block, blocks per stage); widths are 64/128/256/512 (paper table 1).
IMAGENET_ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}
ARCHS = ("cifar", *IMAGENET_ARCHS)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def _stages(
    arch: str, *, depth: int, width: float
) -> tuple[type[BasicBlock | Bottleneck], list[int], list[int]]:
    """The block, the blocks per stage and the channels per stage of ``arch``.

    Raises:
        ConfigError: for an unknown ``arch``, a ``"cifar"`` depth not of the form
            ``6n + 2``, or a ``width`` that is not positive or leaves no channel.
    """
    if arch not in ARCHS:
        raise ConfigError(f"arch={arch!r} must be one of {', '.join(map(repr, ARCHS))}")
    if isinstance(width, bool) or not isinstance(width, int | float) or not width > 0:
        raise ConfigError(f"width={width!r} must be a positive number, e.g. 1.0 or 0.5")
    if arch == "cifar":
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or depth % 6 != 2:
            raise ConfigError(
                f"depth={depth!r} is not of the form 6n+2 (20, 32, 44, 56, 110, 1202); "
                "choose one of those"
            )
        block, layers, base = BasicBlock, [(depth - 2) // 6] * 3, [16, 32, 64]
    else:
        block, layers = IMAGENET_ARCHS[arch]
        base = [64, 128, 256, 512]
    widths = [int(round(c * width)) for c in base]
    if widths[0] < 1:
        raise ConfigError(
            f"width={width!r} leaves {base[0]} * width < 1 channel in the first stage; "
            f"use width >= {1 / base[0]:g}"
        )
    return block, layers, widths


def build_resnet(
    *,
    num_classes: int,
    in_channels: int = 1,
    arch: str = "cifar",
    depth: int = 20,
    width: float = 1.0,
    shortcut: str = "B",
    residual: bool = True,
    zero_init_residual: bool = False,
    stem: str = "small",
    drop_path: float = 0.0,
) -> ResNet:
    """Build a ResNet (or its plain twin) from keyword arguments.

    ``arch``, ``depth`` and ``width`` choose the stages; the other arguments go
    to :class:`ResNet` unchanged, which documents them.

    Args:
        arch: ``"cifar"`` (depth ``6n + 2``, basic blocks, widths 16/32/64) or
            one of ``"resnet18"``, ``"resnet34"``, ``"resnet50"``,
            ``"resnet101"``, ``"resnet152"`` (widths 64/128/256/512).
        depth: Depth of the ``"cifar"`` form; ignored by the others.
        width: Multiplier of every stage's channels, rounded to an integer.

    Returns:
        The network, with ``config`` holding these arguments so that
        ``build_resnet(**model.config)`` rebuilds it.

    Raises:
        ConfigError: (a ``ValueError``) for a value outside these rules or :class:`ResNet`'s.
    """
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    block, layers, widths = _stages(arch, depth=depth, width=width)
    model = ResNet(
        block,
        layers,
        widths,
        num_classes=num_classes,
        in_channels=in_channels,
        stem=stem,
        shortcut=shortcut,
        residual=residual,
        zero_init_residual=zero_init_residual,
        drop_path=drop_path,
    )
    model.config = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "arch": arch,
        "depth": depth,
        "width": float(width),
        "shortcut": shortcut,
        "residual": bool(residual),
        "zero_init_residual": bool(zero_init_residual),
        "stem": stem,
        "drop_path": float(drop_path),
    }
    return model


# CIFAR form (paper section 4.2); the paper's CIFAR results use shortcut="A".
resnet20 = partial(build_resnet, arch="cifar", depth=20)
resnet32 = partial(build_resnet, arch="cifar", depth=32)
resnet44 = partial(build_resnet, arch="cifar", depth=44)
resnet56 = partial(build_resnet, arch="cifar", depth=56)
resnet110 = partial(build_resnet, arch="cifar", depth=110)
resnet1202 = partial(build_resnet, arch="cifar", depth=1202)

# ImageNet form (paper table 1); pass stem="imagenet" for the paper's stem.
resnet18 = partial(build_resnet, arch="resnet18")
resnet34 = partial(build_resnet, arch="resnet34")
resnet50 = partial(build_resnet, arch="resnet50")
resnet101 = partial(build_resnet, arch="resnet101")
resnet152 = partial(build_resnet, arch="resnet152")
