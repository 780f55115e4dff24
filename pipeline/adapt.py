"""Test-time batch-norm adaptation (AdaBN, Li et al. 2016, https://arxiv.org/abs/1603.04779).

A network trained on some speakers or microphones normalises every layer with
the running statistics of its training data. Re-estimating those statistics on
the images of one new group (a speaker, a recording setup), without labels, and
classifying that group with them adapts the network to it. Both ways of
evaluating a network use this: ``task=compare`` on its test groups
(``evaluate.adapt_bn``) and ``task=predict`` on a folder (``predict.adapt_bn``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.fit import autocast, predict_logits
from pipeline.precise_bn import BATCHNORMS

log = logging.getLogger(__name__)

# Values of predict.adapt_bn and evaluate.adapt_bn.
ADAPT_BN = (False, "group")
# Windows per group that give its batch-norm statistics (a random sample beyond this many),
# the fewest for which they are re-estimated at all, and the fewest without a warning that
# they are noisy.
ADAPT_WINDOWS = 4096
MIN_ADAPT_WINDOWS = 2
FEW_ADAPT_WINDOWS = 32


def batchnorm_state(model: nn.Module) -> dict[str, Tensor]:
    """Copies of a network's batch-norm tensors (running mean, variance and count, and the
    unchanged weight and bias)."""
    names = {n for n, m in model.named_modules() if isinstance(m, BATCHNORMS)}
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k.rpartition(".")[0] in names
    }


def use_batchnorm(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load batch-norm tensors from :func:`batchnorm_state` (a group's, or the trained ones)."""
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


@torch.no_grad()
def fold_batch(
    model: nn.Module, images: Tensor, seen: int, *, device: torch.device, amp: bool = True
) -> None:
    """Fold a batch of one group's images (on ``device``) into the batch-norm statistics.

    ``seen`` images are in them already (0 resets them): each layer's running mean and
    variance become the means of the batch statistics so far, each batch weighted by its
    number of images, each layer normalising with its batch statistics as in training. With
    shuffled batches of a group, that is the group's mean and (up to the small spread between
    batch means) its variance. Only the batch norms run in training mode: stochastic depth
    (``resnet.drop_path``) and any dropout stay off, as when the statistics are used. Each
    layer's momentum is restored afterwards.
    """
    layers = [m for m in model.modules() if isinstance(m, BATCHNORMS)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        if seen == 0:
            m.reset_running_stats()
        m.momentum = len(images) / (seen + len(images))
    model.eval()
    for m in layers:
        m.train()
    try:
        with autocast(device, amp):
            model(images.contiguous(memory_format=torch.channels_last))
    finally:
        model.eval()
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum


def enough_windows(key: str, group: str, n: int, *, regex_key: str) -> bool:
    """Whether a group of ``n`` windows gets its own statistics; logs why not, or that they
    are noisy. ``key`` and ``regex_key`` name the settings in the messages."""
    if n < MIN_ADAPT_WINDOWS:
        log.warning(
            "%s: group %r has %d window: it keeps the trained batch-norm statistics", key, group, n
        )
        return False
    if n < FEW_ADAPT_WINDOWS:
        log.warning(
            "%s: group %r has only %d windows, so its batch-norm statistics are noisy; group "
            "more files together (%s)", key, group, n, regex_key,
        )  # fmt: skip
    return True


def group_states(
    model: nn.Module,
    samples: dict[str, Tensor],
    *,
    batch_size: int,
    device: torch.device,
    amp: bool = True,
    seed: int = 0,
    key: str,
    regex_key: str,
) -> dict[str, dict[str, Tensor]]:
    """Each group's batch-norm statistics from a sample of its images (n, C, H, W).

    A group's images are shuffled with a seeded generator (so each batch mixes its classes
    whatever their order) and folded in equal batches of at most ``batch_size``, as in
    training. A group of one image keeps the trained statistics, and a group of few gets a
    warning (``key`` and ``regex_key`` name the settings). The model's trained statistics
    are restored afterwards, also on an error.
    """
    rng = np.random.default_rng(seed)
    trained = batchnorm_state(model)
    states: dict[str, dict[str, Tensor]] = {}
    try:
        for g in sorted(samples):
            images = samples[g]
            if not enough_windows(key, g, len(images), regex_key=regex_key):
                states[g] = trained
                continue
            use_batchnorm(model, trained)
            images = images[torch.from_numpy(rng.permutation(len(images)))]
            done = 0
            for batch in torch.tensor_split(images, -(-len(images) // batch_size)):
                fold_batch(model, batch.to(device), done, device=device, amp=amp)
                done += len(batch)
            states[g] = batchnorm_state(model)
    finally:
        use_batchnorm(model, trained)
    return states


def adapted_logits(
    model: nn.Module,
    x: Tensor,
    groups: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    amp: bool,
    seed: int = 0,
    key: str,
    regex_key: str,
) -> Tensor:
    """Logits (N, n_classes) of images ``x`` (N, C, H, W), each group's with its own
    batch-norm statistics (``groups``: N labels); returned on the CPU.

    At most :data:`ADAPT_WINDOWS` images of a group (a seeded random sample) give its
    statistics (:func:`group_states`). The model's trained statistics are restored
    afterwards.
    """
    rng = np.random.default_rng(seed)
    index = {g: np.flatnonzero(groups == g) for g in sorted(set(groups.tolist()))}
    samples = {
        g: x[torch.from_numpy(i if len(i) <= ADAPT_WINDOWS else
                              np.sort(rng.choice(i, ADAPT_WINDOWS, replace=False)))]
        for g, i in index.items()
    }  # fmt: skip
    states = group_states(model, samples, batch_size=batch_size, device=device, amp=amp,
                          seed=seed, key=key, regex_key=regex_key)  # fmt: skip
    trained = batchnorm_state(model)
    logits = torch.empty(len(x), 0)
    try:
        for g, i in index.items():
            use_batchnorm(model, states[g])
            part = predict_logits(model, x[torch.from_numpy(i)], device=device, amp=amp)
            if logits.shape[1] == 0:
                logits = torch.empty(len(x), part.shape[1])
            logits[torch.from_numpy(i)] = part
    finally:
        use_batchnorm(model, trained)
    return logits
