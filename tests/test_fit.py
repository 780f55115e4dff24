import pytest
import torch
from torch import nn

from pipeline.errors import ConfigError, config_keys
from pipeline.fit import TrainSettings, WeightAverage, _lr_factor, fit, predict_logits
from pipeline.runtime import autocast, resolve_device


class TinyNet(nn.Module):
    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8, n_classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def blobs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    for c in range(3):
        x[y == c, :, 2 * c : 2 * c + 2, :] += 1.5  # the class is a bright band
    return x, y


def test_fit_learns_keeps_best_epoch_and_is_deterministic():
    x, y = blobs(96, 0)
    xv, yv = blobs(30, 1)
    settings = TrainSettings(epochs=6, batch_size=16, lr=0.05)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TinyNet()
        result = fit(
            model,
            x,
            y,
            xv,
            yv,
            settings=settings,
            device=torch.device("cpu"),
            seed=0,
            progress=False,
        )
        runs.append((model, result))
    (model, result), (model2, result2) = runs
    assert len(result.history) == 6
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    best = min(result.history, key=lambda h: (h["val_error"], h["val_loss"]))
    assert result.best_epoch == best["epoch"]
    logits = predict_logits(model, xv, device=torch.device("cpu"))
    assert (logits.argmax(1) != yv).float().mean().item() == pytest.approx(best["val_error"])
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in result2.history]
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_patience_stops_early():
    x, y = blobs(48, 0)
    # A learning rate too small to change the accuracy: no epoch beats the first by accuracy,
    # and loss-only improvements are counted, so stopping must come well before 30 epochs.
    settings = TrainSettings(epochs=30, batch_size=16, lr=1e-12, patience=2, schedule="constant")
    result = fit(
        TinyNet(), x, y, x, y, settings=settings, device=torch.device("cpu"), seed=0, progress=False
    )
    assert len(result.history) < 30


def test_monitor_last_keeps_the_last_epoch_and_still_records_validation():
    x, y = blobs(96, 0)
    xv, yv = blobs(30, 1)
    kept = {}
    for monitor in ("last", "val_accuracy"):
        torch.manual_seed(0)
        model = TinyNet()
        settings = TrainSettings(epochs=5, batch_size=16, lr=0.5, monitor=monitor)
        result = fit(
            model,
            x,
            y,
            xv,
            yv,
            settings=settings,
            device=torch.device("cpu"),
            seed=0,
            progress=False,
        )
        kept[monitor] = (model, result)
    model, result = kept["last"]
    assert result.best_epoch == 5
    assert all(h["val_error"] == h["val_error"] for h in result.history)  # recorded, not NaN
    logits = predict_logits(model, xv, device=torch.device("cpu"))
    assert (logits.argmax(1) != yv).float().mean().item() == pytest.approx(
        result.history[-1]["val_error"]
    )
    # The monitor picks the kept epoch and nothing else: training is the same.
    other = kept["val_accuracy"][1].history
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in other]


def test_multistep_schedule_divides_by_ten_at_milestones():
    s = TrainSettings(epochs=4, milestones=(0.5, 0.75))
    factors = [_lr_factor(step, steps_per_epoch=10, s=s) for step in (0, 19, 20, 29, 30, 39)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    warm = TrainSettings(epochs=4, warmup_epochs=1, schedule="cosine")
    assert _lr_factor(0, steps_per_epoch=10, s=warm) == pytest.approx(0.1)
    assert _lr_factor(39, steps_per_epoch=10, s=warm) < 0.01
    # Over a length in steps (train.min_steps): the milestones move with it.
    longer = [_lr_factor(step, steps_per_epoch=10, s=s, total=100) for step in (49, 50, 75)]
    assert longer == pytest.approx([1, 0.1, 0.01])


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"epochs": 0}, "train.epochs=0 must be a positive integer"),
        ({"optimizer": "lbfgs"}, "train.optimizer='lbfgs' must be one of"),
        ({"lr": 0.0}, "train.lr=0.0 must be a positive number"),
        ({"lr": "abc"}, "train.lr='abc' must be a positive number"),
        ({"grad_clip": -1.0}, r"train.grad_clip=-1.0 must be a positive number, or null"),
        ({"momentum": 2}, r"train.momentum=2 must be a number in \[0, 1\]"),
        ({"amp": "maybe"}, "train.amp='maybe' must be true or false"),
        ({"milestones": (50,)}, r"train.milestones=\[50\] must be fractions of training"),
    ],
)
def test_bad_settings(kw, match):
    # A notebook reads the field's name; the task layer's config_keys gives the config key.
    with pytest.raises(ConfigError, match="^" + match.removeprefix("train.")):
        TrainSettings(**kw)
    with pytest.raises(ConfigError, match="^" + match), config_keys("train."):
        TrainSettings(**kw)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ConfigError, match="device='gpu0' is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:1")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_autocast_is_bf16_only_where_the_cpu_computes_bf16(monkeypatch, native):
    monkeypatch.setattr("pipeline.runtime.cpu_bf16", lambda: native)
    conv = nn.Conv2d(1, 4, 3)
    x = torch.randn(2, 1, 8, 8)
    with autocast(torch.device("cpu"), True):
        on = conv(x)
    with autocast(torch.device("cpu"), False):
        off = conv(x)
    assert on.dtype == (torch.bfloat16 if native else torch.float32)
    assert off.dtype == torch.float32
    assert torch.allclose(on.float(), off, atol=0.05, rtol=0.02)


def test_amp_training_on_the_cpu_learns_as_float32_does_and_keeps_float32_weights(monkeypatch):
    x, y = blobs(96, 0)
    xv, yv = blobs(30, 1)
    histories = []
    for native in (False, True):  # bf16 is emulated on a CPU without it: slower, but bf16
        monkeypatch.setattr("pipeline.runtime.cpu_bf16", lambda native=native: native)
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)
        )
        settings = TrainSettings(epochs=4, batch_size=16, lr=0.05)
        result = fit(
            model,
            x,
            y,
            xv,
            yv,
            settings=settings,
            device=torch.device("cpu"),
            seed=0,
            progress=False,
        )
        assert all(p.dtype == torch.float32 for p in model.parameters())
        histories.append(result.history)
    fp32, bf16 = histories
    assert bf16[-1]["val_error"] == fp32[-1]["val_error"] == 0.0
    assert bf16[0]["train_loss"] == pytest.approx(fp32[0]["train_loss"], rel=0.05)


def test_without_validation_images_the_last_epoch_is_kept_and_the_log_says_why(caplog):
    x, y = blobs(48, 0)
    settings = TrainSettings(epochs=3, batch_size=16, lr=0.05)
    with caplog.at_level("INFO", logger="pipeline.fit"):
        result = fit(
            TinyNet(),
            x,
            y,
            x[:0],
            y[:0],
            settings=settings,
            device=torch.device("cpu"),
            seed=0,
            progress=False,
            name="net",
        )
    assert result.best_epoch == 3
    assert "net: kept epoch 3 (the last epoch: no validation images)" in caplog.text


def test_onecycle_rises_to_the_peak_then_anneals():
    s = TrainSettings(epochs=10, schedule="onecycle")
    factors = [_lr_factor(step, steps_per_epoch=10, s=s) for step in range(100)]
    assert factors[0] == pytest.approx(1 / 25)
    assert max(factors) == pytest.approx(1.0) and factors.index(max(factors)) == 30
    assert factors[-1] < 1e-3


def test_balanced_class_weights_weight_the_loss():
    torch.manual_seed(0)
    x, y = blobs(40, 0)
    keep = (y != 2) | (torch.arange(40) < 8)  # class 2 is rare
    x, y = x[keep], y[keep]
    model = TinyNet()
    initial = TinyNet()
    initial.load_state_dict(model.state_dict())
    s = TrainSettings(
        epochs=1, batch_size=len(y), class_weights="balanced", channels_last=False, amp=False
    )
    result = fit(
        model, x, y, x[:0], y[:0], settings=s, device=torch.device("cpu"), seed=0, progress=False
    )
    counts = torch.bincount(y, minlength=3).float()
    weight = len(y) / (3 * counts)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(initial(x), y, weight=weight).item()
        unweighted = nn.functional.cross_entropy(initial(x), y).item()
    # One batch holding every image: the epoch's loss is the loss at the initial weights.
    assert result.history[0]["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(unweighted, rel=1e-3)


def test_augmented_training_is_seeded_and_changes_the_result():
    x, y = blobs(64, 0)
    aug = {"freq_mask": 2, "time_mask": 2, "time_shift": 0.25, "mixup": 0.2}
    weights = {}
    for key, augment in [("a", aug), ("b", aug), ("none", {})]:
        torch.manual_seed(0)
        model = TinyNet()
        s = TrainSettings(epochs=2, batch_size=16, lr=0.05, augment=augment)
        fit(
            model,
            x,
            y,
            x[:0],
            y[:0],
            settings=s,
            device=torch.device("cpu"),
            seed=0,
            progress=False,
        )
        weights[key] = model.conv.weight.detach().clone()
    assert torch.equal(weights["a"], weights["b"])
    assert not torch.equal(weights["a"], weights["none"])


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"augment": {"cutout": 3}}, "train.augment.cutout is not an augmentation"),
        ({"augment": {"freq_mask": -1}}, "train.augment.freq_mask=-1 must be a whole number"),
        ({"augment": {"time_shift": 2}}, r"train.augment.time_shift=2 must be a fraction"),
        ({"monitor": "f1"}, "train.monitor='f1' must be one of"),
        (
            {"monitor": "last", "patience": 3},
            "train.patience=3 stops on a monitored value, but train.monitor=last keeps the last "
            "epoch whatever the validation says; set monitor to",
        ),
        ({"class_weights": "inverse"}, "train.class_weights='inverse' must be null or"),
        ({"schedule": "step"}, "train.schedule='step' must be one of"),
        ({"ema_epochs": -1}, "train.ema_epochs=-1 must be 0 .off. or a positive number"),
        ({"ema_epochs": None}, "train.ema_epochs=None must be 0 .off. or a positive number"),
        (
            {"max_steps": 5, "min_steps": 10},
            "train.max_steps=5 must be at least train.min_steps=10",
        ),
    ],
)
def test_bad_train_settings_name_the_key(kw, match):
    with pytest.raises(ConfigError, match="^" + match), config_keys("train."):
        TrainSettings(**kw)


def test_weight_average_is_a_running_mean_then_an_exponential_average():
    net = nn.BatchNorm1d(2)  # a parameter, float buffers and an integer counter
    avg = WeightAverage(net, epochs=1, steps_per_epoch=4)  # decay 1 - 1/4
    seen = [net.weight.detach().clone()]
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            net.weight.fill_(value)
            net.running_mean.fill_(value)
        net.num_batches_tracked += 1
        avg.update(net)
        seen.append(net.weight.detach().clone())
    # Three steps: d = min(3/4, t/(t+1)) for t = 0, 1, 2 keeps it a plain mean of the
    # steps, without the initial weights.
    assert torch.allclose(avg.model.weight, torch.stack(seen[1:]).mean(0))
    assert torch.allclose(avg.model.running_mean, torch.tensor([2.0, 2.0]))  # (1+2+3)/3
    assert avg.model.num_batches_tracked.item() == 3
    with torch.no_grad():
        net.weight.fill_(7.0)
    before = avg.model.weight.detach().clone()
    avg.update(net)  # the fourth update: d = 3/4 from here on
    assert torch.allclose(avg.model.weight, 0.75 * before + 0.25 * 7.0)
    assert not avg.model.weight.requires_grad


def test_fit_with_a_weight_average_validates_and_keeps_the_average():
    x, y = blobs(96, 0)
    xv, yv = blobs(30, 1)
    models = {}
    for ema in (0.0, 1e-9, 2.0):  # off; a horizon under one step, which is no average; on
        torch.manual_seed(0)
        models[ema] = TinyNet()
        s = TrainSettings(epochs=5, batch_size=16, lr=0.05, ema_epochs=ema)
        result = fit(
            models[ema],
            x,
            y,
            xv,
            yv,
            settings=s,
            device=torch.device("cpu"),
            seed=0,
            progress=False,
        )
    for a, b in zip(models[0.0].parameters(), models[1e-9].parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(models[0.0].conv.weight, models[2.0].conv.weight)
    # The recorded validation error is the kept (averaged) weights' error.
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    logits = predict_logits(models[2.0], xv, device=torch.device("cpu"))
    assert (logits.argmax(1) != yv).float().mean().item() == pytest.approx(best["val_error"])


def test_resuming_a_checkpoint_without_an_average_starts_it_from_the_resumed_weights(tmp_path):
    from pipeline.fit import _load_checkpoint, _make_optimizer, _rng_states, _save_checkpoint

    torch.manual_seed(0)
    model, fresh = TinyNet(), TinyNet()
    s = TrainSettings()
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    path = tmp_path / "m.pt"
    _save_checkpoint(path, {"epoch": 3}, model, _make_optimizer(model, s), scaler, _rng_states(1))
    ema = WeightAverage(fresh, epochs=1, steps_per_epoch=10)  # holds fresh's random weights
    state = _load_checkpoint(path, fresh, _make_optimizer(fresh, s), scaler, ema)
    assert state["epoch"] == 3
    for a, b in zip(ema.model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_layout_is_refused_with_one_sentence(tmp_path):
    from pipeline.fit import _load_checkpoint, _make_optimizer

    model, s = TinyNet(), TrainSettings()
    path = tmp_path / "old.pt"
    # the layout of an older version: the random state under "torch_rng", no "rng"
    torch.save({"epoch": 1, "model": model.state_dict(), "torch_rng": torch.get_rng_state()}, path)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    with pytest.raises(
        ConfigError, match=r"^resume: .*old\.pt is not a checkpoint of this version"
    ):
        _load_checkpoint(path, model, _make_optimizer(model, s), scaler)
    train_resume = r"^train\.resume: .*delete it to train this model from"
    with pytest.raises(ConfigError, match=train_resume), config_keys("train."):
        _load_checkpoint(path, model, _make_optimizer(model, s), scaler)
