"""Batch-norm statistics that describe the data: "precise BN" (Wu and Johnson 2021,
https://arxiv.org/abs/2105.07576; pycls's ``compute_precise_bn_stats``).

During training a batch norm keeps an exponential moving average of its batch statistics
(momentum 0.1: a horizon of about ten steps). After a few hundred steps on a small training
set, or with weights still moving fast, that average describes no network the weights ever
were, and evaluation mode is broken: GunPoint's 42 training windows gave one step per epoch,
training accuracy 1.0 and validation at chance. Here each layer's running mean and variance
are recomputed from the training windows themselves, one layer at a time in the order the
forward pass reaches them, with the network in evaluation mode and every earlier layer
already using its new statistics. So in evaluation mode every batch norm's input has, over
these windows, exactly the mean and variance it normalises with.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.features.stft import merge_moments
from pipeline.runtime import in_format

log = logging.getLogger(__name__)

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Training windows that give the statistics: a seeded random sample beyond this many (pycls
# uses 8,192 images; the cost is about half a forward pass per layer over them).
PRECISE_BN_WINDOWS = 4096


class _Reached(Exception):
    """Raised by a hook to end a forward pass once the layer being measured has its input."""


def execution_order(model: nn.Module, x: Tensor) -> list[nn.Module]:
    """The model's batch norms in the order one forward pass of ``x`` calls them.

    Registration order can differ (a projection shortcut is often registered after the
    layers it runs beside); a layer that the pass never calls is left out.
    """
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, _: order.append(mod) if mod not in order else None)
        for m in model.modules()
        if isinstance(m, BATCHNORMS)
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return order


@torch.no_grad()
def precise_batchnorm(
    model: nn.Module,
    x: Tensor,
    *,
    batch_size: int,
    device: torch.device,
    autocast,
    memory_format: torch.memory_format = torch.contiguous_format,
    max_windows: int = PRECISE_BN_WINDOWS,
    seed: int = 0,
) -> dict:
    """Recompute every batch norm's running mean and variance over images ``x``.

    Args:
        model: the network, on ``device``; left in evaluation mode.
        x: training images (N, C, H, W) on the CPU or on ``device``, in evaluation order
            (no augmentation); at most ``max_windows`` of them (a sample seeded by ``seed``).
        batch_size: images per forward pass.
        device: where the model runs.
        autocast: a callable returning the autocast context evaluation runs under, so the
            statistics are those of the precision the network is evaluated in.
        memory_format: the layout the model is evaluated in.
        max_windows: the most images used.
        seed: draws the sample when ``x`` holds more than ``max_windows``.

    Returns:
        ``{"layers": n, "windows": m, "seconds": s}``.
    """
    t0 = time.perf_counter()
    model.eval()
    x = _sample(x, max_windows=max_windows, seed=seed)
    batches = [b for b in torch.split(x, batch_size) if len(b)]
    if not batches:
        return {"layers": 0, "windows": 0, "seconds": 0.0}

    def on_device(b: Tensor) -> Tensor:
        return in_format(b.to(device, non_blocking=True), memory_format)

    with autocast():
        layers = execution_order(model, on_device(batches[0][:2]))
    for layer in layers:
        if layer.running_mean is None:  # track_running_stats=False: batch statistics always
            continue
        mean, var = _input_moments(model, layer, batches, on_device=on_device, autocast=autocast)
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.to(layer.running_var.dtype))
    seconds = time.perf_counter() - t0
    return {"layers": len(layers), "windows": int(len(x)), "seconds": seconds}


def _sample(x: Tensor, *, max_windows: int, seed: int) -> Tensor:
    """``x``, or a sorted random sample of ``max_windows`` of its images seeded by ``seed``,
    as a tensor (an :class:`~pipeline.features.view.ImageView` is read)."""
    if len(x) > max_windows:
        pick = np.sort(np.random.default_rng(seed).choice(len(x), max_windows, replace=False))
        return x[torch.from_numpy(pick).to(x.device)]
    return x if isinstance(x, Tensor) else x[:]


def _input_moments(
    model: nn.Module,
    layer: nn.Module,
    batches: list[Tensor],
    *,
    on_device,
    autocast,
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance (float64, (C,)) of ``layer``'s input.

    Each batch's forward pass stops at ``layer``, so later layers cost nothing. A batch's
    moments are taken in float32 in place (no float64 copy of the activation: at 128x64
    images that copy was 270 MB a batch) and merged across batches in float64 with Chan's
    formula, so the result is the single pass's over every window.
    """
    total = None

    def measure(_mod, inputs):
        nonlocal total
        z = inputs[0].float()  # a copy only where the pass runs in bf16
        var, mean = torch.var_mean(z, dim=[d for d in range(z.dim()) if d != 1], correction=0)
        n = z.numel() // z.shape[1]
        total = merge_moments(total, (n, mean.double(), var.double() * n))
        raise _Reached

    hook = layer.register_forward_pre_hook(measure)
    try:
        for b in batches:
            try:
                with autocast():
                    model(on_device(b))
            except _Reached:
                pass
    finally:
        hook.remove()
    count, mean, m2 = total
    return mean, m2 / max(1, count - 1)
