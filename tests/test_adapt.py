"""Test-time batch-norm adaptation (pipeline/adapt.py) on a tiny ResNet-20."""

from itertools import combinations

import numpy as np
import pytest
import torch

from pipeline import adapt
from pipeline.adapt import adapted_logits, batchnorm_state, fold_batch, group_states
from pipeline.fit import predict_logits
from pipeline.models import resnet as R

CPU = torch.device("cpu")
KEYS = {"key": "evaluate.adapt_bn", "regex_key": "data.group_regex"}


def trained_like(**kwargs) -> torch.nn.Module:
    """A ResNet-20 whose batch norms hold statistics of some other data, as after training."""
    torch.manual_seed(0)
    model = R.resnet20(num_classes=3, **kwargs)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 12, 12) * 3 + 1)
    return model.eval()


def first_bn_mean(model) -> torch.Tensor:
    return model.stem[1].running_mean.clone()


def stem_mean(model, x) -> torch.Tensor:
    """What the first batch norm's running mean should be after adapting to ``x``."""
    with torch.no_grad():
        return model.stem[0](x).mean(dim=(0, 2, 3))


def test_adaptation_keeps_stochastic_depth_off_and_is_repeatable():
    model = trained_like(drop_path=0.5)
    x = torch.randn(8, 1, 12, 12)
    states = []
    for _ in range(2):
        fold_batch(model, x, 0, device=CPU, amp=False)
        states.append(batchnorm_state(model))
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0, msg=k)
    # ... and equals the adaptation of the same weights without stochastic depth.
    twin = trained_like()
    twin.load_state_dict(model.state_dict())
    fold_batch(twin, x, 0, device=CPU, amp=False)
    for k, v in batchnorm_state(twin).items():
        torch.testing.assert_close(states[0][k], v, msg=k)
    assert not model.training and not any(m.training for m in model.modules())


def test_each_group_is_classified_with_its_own_statistics():
    model = trained_like()
    trained = batchnorm_state(model)
    x = torch.cat([torch.randn(6, 1, 12, 12) * 2 - 1, torch.randn(1, 1, 12, 12)])
    groups = np.array(["a"] * 6 + ["b"], dtype=object)
    logits = adapted_logits(model, x, groups, batch_size=4, device=CPU, amp=False, **KEYS)
    after = batchnorm_state(model)
    assert all(torch.equal(trained[k], after[k]) for k in trained)  # the trained ones are back
    # "b" has one window: it keeps the trained statistics, so its logits are the unadapted ones.
    torch.testing.assert_close(logits[6:], predict_logits(model, x[6:], device=CPU, amp=False))
    # "a": the group's own statistics, folded in two batches of 3 (equal batches of at most 4).
    states = group_states(model, {"a": x[:6]}, batch_size=4, device=CPU, amp=False, **KEYS)
    torch.testing.assert_close(states["a"]["stem.1.running_mean"], stem_mean(model, x[:6]))
    model.load_state_dict(states["a"], strict=False)
    torch.testing.assert_close(logits[:6], predict_logits(model, x[:6], device=CPU, amp=False))
    model.load_state_dict(trained, strict=False)
    assert not torch.allclose(logits[:6], predict_logits(model, x[:6], device=CPU, amp=False))


def test_trained_statistics_come_back_after_an_error(monkeypatch):
    model = trained_like()
    before = first_bn_mean(model)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(adapt, "predict_logits", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        adapted_logits(
            model,
            torch.randn(5, 1, 12, 12),
            np.array(["a"] * 5, dtype=object),
            batch_size=4,
            device=CPU,
            amp=False,
            **KEYS,
        )
    torch.testing.assert_close(first_bn_mean(model), before, rtol=0, atol=0)


def test_a_large_group_is_sampled(monkeypatch, caplog):
    model = trained_like()
    x = torch.randn(6, 1, 12, 12) * 2
    monkeypatch.setattr(adapt, "ADAPT_WINDOWS", 3)
    captured = {}
    real = adapt.group_states

    def spy(model, samples, **kwargs):
        captured.update(samples)
        return real(model, samples, **kwargs)

    monkeypatch.setattr(adapt, "group_states", spy)
    with caplog.at_level("WARNING", logger="pipeline.adapt"):
        adapted_logits(
            model, x, np.array(["a"] * 6, dtype=object), batch_size=8, device=CPU, amp=False, **KEYS
        )
    sample = captured["a"]
    assert len(sample) == 3
    assert any(torch.equal(sample, x[list(c)]) for c in combinations(range(6), 3))
    # three windows are few: the warning names the setting and the fix
    assert "evaluate.adapt_bn: group 'a' has only 3 windows" in caplog.text
    assert "(data.group_regex)" in caplog.text
