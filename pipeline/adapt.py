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
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.features.view import take
from pipeline.fit import predict_logits
from pipeline.precise_bn import BATCHNORMS
from pipeline.runtime import autocast, in_format

log = logging.getLogger(__name__)

# Values of predict.adapt_bn, and of evaluate.adapt_bn, which also takes auto: adapt when the
# test split holds groups that training never saw (see :func:`decide`).
ADAPT_BN = (False, "group")
AUTO = "auto"
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
            model(in_format(images, torch.channels_last))
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
            "more files together (%s)",
            key,
            group,
            n,
            regex_key,
        )
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
    samples = {}
    for g, i in index.items():
        pick = (
            i if len(i) <= ADAPT_WINDOWS else np.sort(rng.choice(i, ADAPT_WINDOWS, replace=False))
        )
        samples[g] = x[torch.from_numpy(pick)]
    states = group_states(
        model,
        samples,
        batch_size=batch_size,
        device=device,
        amp=amp,
        seed=seed,
        key=key,
        regex_key=regex_key,
    )
    trained = batchnorm_state(model)
    logits = torch.empty(len(x), 0)
    try:
        for g, i in index.items():
            use_batchnorm(model, states[g])
            part = predict_logits(model, take(x, i), device=device, amp=amp)
            if logits.shape[1] == 0:
                logits = torch.empty(len(x), part.shape[1])
            logits[torch.from_numpy(i)] = part
    finally:
        use_batchnorm(model, trained)
    return logits


@dataclass(frozen=True)
class Decision:
    """Whether the networks' test evaluation is also run adapted, and why (one sentence).

    Attributes:
        apply: evaluate each test group with its own batch-norm statistics too.
        why: the reason, for the log and the report.
        unseen: the test groups that no training file belongs to.
        suggestion: when the files carry no groups but the test files were picked by a
            pattern or folder, the setting that would give them groups (else None).
    """

    apply: bool
    why: str
    unseen: tuple[str, ...] = ()
    suggestion: str | None = None


def decide(
    mode: bool | str,
    *,
    train_groups: set[str],
    test_groups: set[str],
    grouped: bool,
    split: str,
    test_regex: str | None = None,
    names: dict[str, list[str]] | None = None,
) -> Decision:
    """Decide ``evaluate.adapt_bn`` for one run.

    Args:
        mode: false, ``group`` (always adapt) or ``auto`` (adapt when every test group is
            one that training never saw: a held-out speaker, machine or load).
        train_groups: the groups of the training files ("" for a file without one).
        test_groups: the groups of the test files.
        grouped: whether the files carry groups at all (``data.group_regex`` or a manifest's
            group column).
        split: the split strategy used (``group``, ``regex``, ``folders``, ``random``, ...).
        test_regex: ``data.test_regex`` of a regex split, for the suggestion.
        names: {"train": [...], "test": [...]} file names, for the suggestion.
    """
    if mode is False:
        return Decision(False, "evaluate.adapt_bn=false")
    if mode == "group":
        return Decision(True, "evaluate.adapt_bn=group", tuple(sorted(test_groups - train_groups)))
    test, train = test_groups - {""}, train_groups - {""}
    if not grouped or not test:
        suggestion = suggest_groups(split, test_regex=test_regex, names=names or {})
        why = (
            "the files carry no groups (data.group_regex or a manifest's group column), so no "
            "test group can be told from the training ones"
        )
        return Decision(False, why, suggestion=suggestion)
    shared = sorted(test & train)
    if shared:
        why = (
            f"the test groups also occur in training ({_listed(shared)}), so the test split "
            "holds no condition the networks never saw"
        )
        return Decision(False, why)
    unseen = tuple(sorted(test))
    why = f"the test split holds groups never seen in training ({_listed(unseen)})"
    return Decision(True, why, unseen)


def _listed(groups, most: int = 6) -> str:
    shown = ", ".join(map(str, list(groups)[:most]))
    return shown + (f" and {len(groups) - most} more" if len(groups) > most else "")


# The parts of a test pattern that may name the condition in file names (97_3.mat, take_12.wav,
# pump_b_07.wav): a class of digits ([0-4], \d, \d+), a run of digits, or a literal word.
_PART = re.compile(r"\[\d(?:-\d)?\]\+?|\\d\+?|(?<![A-Za-z0-9\\])[A-Za-z0-9]+(?![A-Za-z0-9])")
GENERAL_ADVICE = (
    "if the test files hold conditions training never saw (a machine, a load, a speaker), set "
    "data.group_regex to capture that condition from the file names (or give a manifest with "
    "a group column): the networks are then also evaluated adapted to each"
)


def suggest_groups(
    split: str, *, test_regex: str | None, names: dict[str, list[str]]
) -> str | None:
    r"""The ``data.group_regex`` that would give the files groups, when the split suggests one.

    For a regex split, each part of ``test_regex`` that may name a condition (a digit class,
    digits, a word) is tried in turn as a capture group (``_3\.mat$`` -> ``_(\d+)\.mat$``,
    ``_b_`` -> ``_([A-Za-z0-9]+)_``); the first that matches every file name and gives the
    test files groups no training file has is offered. Otherwise, and for a folder split,
    the general advice. Never applied, only suggested; None for other splits.
    """
    if split not in ("regex", "folders"):
        return None
    for candidate in _candidates(test_regex or "") if split == "regex" else []:
        groups = _groups(candidate, names)
        if groups is not None and groups["test"].isdisjoint(groups["train"]):
            return (
                f"if {_listed(sorted(groups['test']))} in the test files' names (the part of "
                "data.test_regex that picks them) name conditions training never saw (a load, "
                f"a machine, a speaker), set \"data.group_regex='{candidate}'\": the networks "
                "are then also evaluated adapted to each"
            )
    return GENERAL_ADVICE


def _candidates(test_regex: str) -> list[str]:
    out = []
    for m in _PART.finditer(test_regex):
        digits = m.group().startswith(("[", "\\")) or m.group().isdigit()
        group = r"(\d+)" if digits else "([A-Za-z0-9]+)"
        out.append(test_regex[: m.start()] + group + test_regex[m.end() :])
    return out


def _groups(candidate: str, names: dict[str, list[str]]) -> dict[str, set[str]] | None:
    """Each split's groups under ``candidate``, or None if it is no regex or misses a name."""
    try:
        pattern = re.compile(candidate)
    except re.error:
        return None
    if pattern.groups < 1:  # the part sat inside a character class: no group
        return None
    groups = {}
    for split_name in ("train", "test"):
        found = [pattern.search(n) for n in names.get(split_name, [])]
        if not found or not all(found):
            return None
        groups[split_name] = {m.group(1) for m in found}
    return groups
