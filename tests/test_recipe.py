"""The default recipe adapts to the data: training length in steps, the batch size, precise
batch-norm statistics, the kept epoch, and STFT sizes that follow the window."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.fit import TrainSettings, auto_batch_size, fit, plan_training
from pipeline.models.resnet import build_resnet
from pipeline.precise_bn import BATCHNORMS, precise_batchnorm

CPU = torch.device("cpu")


def test_batch_size_auto_is_a_quarter_of_the_training_windows_within_8_and_128():
    assert [auto_batch_size(n) for n in (5, 42, 80, 742, 100_000)] == [8, 10, 20, 128, 128]


def test_a_small_set_trains_the_floor_of_steps_and_a_large_one_is_capped():
    s = TrainSettings(epochs=30, batch_size="auto", min_steps=300, max_steps=20_000)
    small = plan_training(s, n_train=42)  # GunPoint's training windows
    assert (small.batch_size, small.steps_per_epoch, small.steps) == (10, 5, 300)
    assert small.epochs == 60 and "min_steps=300" in small.why
    large = plan_training(s, n_train=100_000)
    assert (large.batch_size, large.steps) == (128, 20_000) and large.epochs == 26
    middle = plan_training(replace(s, min_steps=150), n_train=742)  # 30 epochs are enough
    assert (middle.batch_size, middle.steps_per_epoch, middle.steps, middle.epochs) == (
        128,
        6,
        180,
        30,
    )
    assert "30 epochs of 6 steps at batch 128" in middle.why
    # Under torchrun the global batch is shared out, so every rank steps as often.
    assert plan_training(s, n_train=42, world=2).steps == 300


def test_fit_takes_exactly_the_planned_optimizer_steps():
    torch.manual_seed(0)
    x, y = torch.randn(42, 1, 8, 8), torch.arange(42) % 2
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    steps = []
    model.register_forward_hook(lambda m, i, o: steps.append(1) if m.training else None)
    sizes = []
    model.register_forward_pre_hook(lambda m, i: sizes.append(len(i[0])) if m.training else None)
    s = TrainSettings(epochs=2, batch_size="auto", min_steps=50, lr=0.01)
    result = fit(model, x, y, x[:0], y[:0], settings=s, device=CPU, seed=0, progress=False)
    assert len(steps) == 50 and result.plan.steps == 50
    assert len(result.history) == result.plan.epochs == 10  # 5 steps an epoch at batch 10
    assert set(sizes) == {8, 9}  # equal batches: 42 windows as 9, 9, 8, 8, 8, not 10 x 4 + 2


def test_step_settings_are_checked():
    with pytest.raises(ConfigError, match="^max_steps=10 must be at least min_steps=100"):
        TrainSettings(min_steps=100, max_steps=10)
    with pytest.raises(ConfigError, match="^batch_size='big' must be a positive integer or auto"):
        TrainSettings(batch_size="big")
    with pytest.raises(ConfigError, match="^min_steps=-1 must be a whole number"):
        TrainSettings(min_steps=-1)


def test_monitor_auto_keeps_the_last_epoch_when_validation_is_small():
    s = TrainSettings(monitor="auto")
    assert plan_training(s, n_train=100, n_val=8, n_classes=2).monitor == "last"
    assert plan_training(s, n_train=1000, n_val=154, n_classes=7).monitor == "val_accuracy"


def _batchnorm_inputs(model, x):
    """Each batch norm's input over ``x`` in evaluation mode: (mean, variance) per channel."""
    seen = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, inp: seen.setdefault(mod, []).append(inp[0].transpose(0, 1).flatten(1))
        )
        for m in model.modules()
        if isinstance(m, BATCHNORMS)
    ]
    model.eval()
    with torch.no_grad():
        for b in torch.split(x, 16):
            model(b)
    for h in hooks:
        h.remove()
    return {
        m: (torch.cat(v, 1).double().mean(1), torch.cat(v, 1).double().var(1))
        for m, v in seen.items()
    }


def test_precise_bn_makes_evaluation_statistics_those_of_the_training_windows():
    torch.manual_seed(0)
    model = build_resnet(depth=8, num_classes=3, in_channels=1)
    x = torch.randn(70, 1, 16, 12) * 3 + 1  # far from the initial statistics (0, 1)
    model.train()
    with torch.no_grad():
        model(x[:4])  # one small step's worth of moving average: stale statistics
    stale = _batchnorm_inputs(model, x)
    layer = next(iter(stale))
    assert not torch.allclose(layer.running_mean.double(), stale[layer][0], atol=1e-2)

    done = precise_batchnorm(model, x, batch_size=16, device=CPU, autocast=torch.no_grad)
    assert done["layers"] == sum(isinstance(m, BATCHNORMS) for m in model.modules())
    for m, (mean, var) in _batchnorm_inputs(model, x).items():
        # A fresh evaluation-mode pass sees exactly the statistics each layer normalises with.
        assert torch.allclose(m.running_mean.double(), mean, atol=1e-4, rtol=1e-4)
        assert torch.allclose(m.running_var.double(), var, atol=1e-4, rtol=1e-4)
    assert not model.training


def test_precise_bn_repairs_evaluation_after_few_steps():
    """GunPoint's failure in miniature: a network that fits its few training windows in
    training mode but is at chance in evaluation mode, until its statistics are recomputed."""
    torch.manual_seed(0)
    y = torch.arange(40) % 2
    x = torch.randn(40, 1, 9, 16) * 0.5 + 4.0
    x[y == 1, :, :3] += 2.0  # class 1: energy in the low rows
    model = build_resnet(depth=8, num_classes=2, in_channels=1)
    s = TrainSettings(epochs=8, batch_size=40, lr=0.1, precise_bn=False, amp=False)
    fit(model, x, y, x[:0], y[:0], settings=s, device=CPU, seed=0, progress=False)

    def accuracy():
        model.eval()
        with torch.no_grad():
            return (model(x).argmax(1) == y).float().mean().item()

    assert accuracy() == 0.5  # 8 steps: training accuracy 1.0, evaluation at chance
    precise_batchnorm(model, x, batch_size=16, device=CPU, autocast=torch.no_grad)
    assert accuracy() == 1.0


def test_fit_recomputes_the_statistics_and_reports_validation_before_and_after():
    torch.manual_seed(0)
    x, y = torch.randn(24, 1, 8, 8), torch.arange(24) % 2
    model = build_resnet(depth=8, num_classes=2, in_channels=1)
    s = TrainSettings(epochs=1, batch_size=8, lr=0.01, amp=False)
    result = fit(model, x, y, x[:6], y[:6], settings=s, device=CPU, seed=0, progress=False)
    assert result.precise_bn["windows"] == 24 and result.precise_bn["layers"] > 0
    assert {"val_accuracy_before", "val_accuracy_after"} <= set(result.precise_bn)


# --- STFT sizes follow the window --------------------------------------------------------------


def compose(*overrides: str):
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(
    "preset",
    [
        ["features.hop_length=128", "features.win_length=256"],  # as a preset would fix them
        ["+experiment=fsdd", "features.n_mels=null", "features.f_min=0.0"],  # 256/128/256
    ],
)
def test_auto_sizes_follow_the_window_whatever_the_preset_fixed(preset):
    from pipeline.tasks.compare import stft_params

    cfg = compose(*preset, "features.n_fft=auto")
    p = stft_params(cfg, sample_rate=8000, segment_samples=150, explicit={"features.n_fft"})
    assert (p.n_fft, p.hop_length, p.win_length) == (16, 4, 16)
    # Sizes the command line sets still win: n_fft grows to hold the window, which here
    # cannot fit the 150-sample series, so it is refused naming the window setting.
    both = {"features.n_fft", "features.win_length", "features.hop_length"}
    kept = stft_params(cfg, sample_rate=8000, segment_samples=1000, explicit=both)
    assert (kept.n_fft, kept.hop_length, kept.win_length) == (256, 128, 256)
    with pytest.raises(ConfigError, match="features.win_length=256 is longer than the 150-sample"):
        stft_params(cfg, sample_rate=8000, segment_samples=150, explicit=both)


def test_size_auto_shrinks_large_images_and_never_stretches_small_ones():
    from pipeline.tasks.compare import stft_params

    cfg = compose()
    assert stft_params(cfg, sample_rate=1, segment_samples=150, explicit=set()).size == (9, 38)
    default = stft_params(cfg, sample_rate=4000, segment_samples=4000, explicit=set())
    assert (default.n_fft, default.hop_length, default.size) == (256, 128, (64, 32))
    long = stft_params(cfg, sample_rate=8000, segment_samples=18_262, explicit=set())
    assert long.size == (64, 64) and long.n_frames(18_262) > 64
    with pytest.raises(ConfigError, match="features.size='big' must be"):
        stft_params(compose("features.size=big"), explicit=set())
