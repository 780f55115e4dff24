"""Tests of the ResNet and its plain twin: sizes, shapes, the shortcut, training, errors."""

import json
from functools import partial

import pytest
import torch
from torch import nn

from pipeline.models import resnet as R
from pipeline.models.resnet import BasicBlock, Bottleneck, DropPath, build_resnet


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]


def last_bn(block: nn.Module) -> nn.BatchNorm2d:
    return block.bn3 if isinstance(block, Bottleneck) else block.bn2


# -- parameter counts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        (R.resnet18, 11_689_512),
        (R.resnet34, 21_797_672),
        (R.resnet50, 25_557_032),
        (R.resnet101, 44_549_160),
        (R.resnet152, 60_192_808),
    ],
    ids=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
)
def test_imagenet_form_has_torchvision_parameter_count(builder, expected):
    model = builder(num_classes=1000, in_channels=3, stem="imagenet")
    assert n_params(model) == expected


# The paper's table 6 (CIFAR-10, option A) in millions of parameters.
@pytest.mark.parametrize(
    ("builder", "millions", "tolerance"),
    [
        (R.resnet20, 0.27, 0.005),
        (R.resnet32, 0.46, 0.005),
        (R.resnet44, 0.66, 0.005),
        (R.resnet56, 0.85, 0.005),
        (R.resnet110, 1.7, 0.05),
    ],
    ids=["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"],
)
def test_cifar_form_matches_paper_parameter_count(builder, millions, tolerance):
    model = builder(num_classes=10, in_channels=3, shortcut="A")
    assert n_params(model) / 1e6 == pytest.approx(millions, abs=tolerance)


@pytest.mark.parametrize("kwargs", [{"depth": 20}, {"arch": "resnet50", "width": 0.25}])
def test_option_a_costs_nothing_and_projections_cost_more(kwargs):
    counts = {
        name: n_params(build_resnet(num_classes=10, **kwargs, **extra))
        for name, extra in {
            "plain": {"residual": False},
            "A": {"shortcut": "A"},
            "B": {"shortcut": "B"},
            "C": {"shortcut": "C"},
        }.items()
    }
    assert counts["A"] == counts["plain"] < counts["B"] < counts["C"]


# -- the contract every builder keeps ---------------------------------------------------------

BUILDERS = {
    "resnet20-A": partial(R.resnet20, shortcut="A"),
    "resnet20-B": R.resnet20,
    "resnet20-C": partial(R.resnet20, shortcut="C"),
    "plain20": partial(R.resnet20, residual=False),
    "resnet32": R.resnet32,
    "resnet44": R.resnet44,
    "resnet56": R.resnet56,
    "resnet110": R.resnet110,
    # Untrained, in eval mode, 600 residual blocks double the activations' variance 600 times
    # (inf); zero-initialised branches keep the untrained network finite.
    "resnet1202-half": partial(R.resnet1202, width=0.5, zero_init_residual=True),
    "resnet18-small": partial(R.resnet18, width=0.25),
    "resnet18-imagenet": partial(R.resnet18, stem="imagenet"),
    "resnet34-imagenet": partial(R.resnet34, stem="imagenet", width=0.5),
    "resnet50-small-A": partial(R.resnet50, width=0.25, shortcut="A"),
    "resnet50-imagenet": partial(R.resnet50, stem="imagenet"),
    "resnet101-imagenet": partial(R.resnet101, stem="imagenet", width=0.25),
    "resnet152-imagenet-plain": partial(R.resnet152, stem="imagenet", width=0.25, residual=False),
}
SIZES = [(64, 32), (33, 17), (16, 16), (64, 64)]


@pytest.mark.parametrize("in_channels", [1, 2])
@pytest.mark.parametrize("name", BUILDERS)
def test_builder_gives_logits_for_any_image_size(name, in_channels):
    torch.manual_seed(0)
    model = BUILDERS[name](num_classes=5, in_channels=in_channels).eval()
    with torch.no_grad():
        for height, width in SIZES:
            x = torch.randn(2, in_channels, height, width)
            out = model(x)
            assert out.shape == (2, 5), (height, width)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
def test_batch_equals_its_items(shortcut):
    torch.manual_seed(0)
    model = R.resnet20(num_classes=3, shortcut=shortcut).eval()
    x = torch.randn(3, 1, 33, 17)
    with torch.no_grad():
        batch = model(x)
        items = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, items, rtol=1e-4, atol=1e-5)


# -- the plain twin has no shortcut -----------------------------------------------------------


@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
@pytest.mark.parametrize(
    "kwargs", [{"depth": 20}, {"arch": "resnet50", "width": 0.25}], ids=["basic", "bottleneck"]
)
def test_plain_twin_has_no_path_around_its_blocks(kwargs, shortcut):
    torch.manual_seed(0)
    residual = build_resnet(num_classes=3, shortcut=shortcut, **kwargs).eval()
    plain = build_resnet(num_classes=3, residual=False, **kwargs).eval()
    # Same convolutions, batch norms and classifier; only the shortcuts differ.
    loaded = plain.load_state_dict(residual.state_dict(), strict=False)
    assert loaded.missing_keys == []
    assert all(".shortcut." in key for key in loaded.unexpected_keys)
    assert (loaded.unexpected_keys == []) == (shortcut == "A")

    x1, x2 = torch.randn(2, 2, 1, 24, 20)
    with torch.no_grad():
        assert not torch.allclose(plain(x1), plain(x2))  # the property below is not vacuous

        # Silence every residual branch: its last batch norm now outputs zeros.
        for net in (residual, plain):
            for block in blocks(net):
                nn.init.zeros_(last_bn(block).weight)
                nn.init.zeros_(last_bn(block).bias)

        # The residual net still carries the input through its shortcuts ...
        assert not torch.allclose(residual(x1), residual(x2))
        # ... the plain net has nothing left: every input gives the classifier's bias.
        torch.testing.assert_close(plain(x1), plain(x2))
        torch.testing.assert_close(plain(x1), plain.fc.bias.expand(2, -1))


@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
@pytest.mark.parametrize(
    "kwargs", [{"depth": 20}, {"arch": "resnet50", "width": 0.25}], ids=["basic", "bottleneck"]
)
def test_same_seed_gives_twins_the_same_weights(kwargs, shortcut):
    torch.manual_seed(0)
    residual = build_resnet(num_classes=3, shortcut=shortcut, **kwargs).state_dict()
    torch.manual_seed(0)
    plain = build_resnet(num_classes=3, residual=False, **kwargs).state_dict()
    for key, value in plain.items():
        torch.testing.assert_close(residual[key], value, rtol=0, atol=0, msg=key)
    torch.manual_seed(1)
    other = build_resnet(num_classes=3, residual=False, **kwargs).state_dict()
    assert not torch.equal(other["fc.weight"], plain["fc.weight"])


def test_zero_init_residual_zeroes_last_batch_norm_of_each_block_only():
    model = R.resnet50(num_classes=3, width=0.25, zero_init_residual=True)
    last = {id(last_bn(block)) for block in blocks(model)}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert bool((m.weight == 0).all()) == (id(m) in last)


# -- stochastic depth -------------------------------------------------------------------------


def test_drop_path_rises_linearly_to_the_last_block():
    model = R.resnet20(num_classes=3, drop_path=0.3)
    probs = [b.drop_path.p for b in blocks(model)]
    assert probs == pytest.approx([0.3 * (i + 1) / 9 for i in range(9)])
    assert not any(isinstance(m, DropPath) for m in R.resnet20(num_classes=3).modules())


def test_drop_path_zeroes_whole_samples_and_rescales_the_rest():
    torch.manual_seed(0)
    x = torch.rand(2000, 2, 3, 3) + 1.0
    drop = DropPath(0.3).train()
    out = drop(x)
    ratio = (out / x).flatten(1)
    dropped = (ratio == 0).all(1)
    kept = torch.isclose(ratio, torch.tensor(1 / 0.7)).all(1)
    assert bool((dropped | kept).all())  # every sample is all dropped or all kept
    assert abs(dropped.float().mean().item() - 0.3) < 0.05  # 2000 draws: std 0.01
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("projection", [False, True], ids=["identity", "projection"])
def test_a_dropped_block_is_its_shortcut_and_evaluation_ignores_drop_path(projection):
    torch.manual_seed(0)
    out_planes, stride = (8, 2) if projection else (4, 1)
    shortcut = R.ProjectionShortcut(4, 8, 2) if projection else nn.Identity()
    block = BasicBlock(4, out_planes, stride, shortcut=shortcut, drop_path=0.5).train()
    x = torch.randn(64, 4, 5, 5)
    out = block(x)
    # The branch and shortcut in training mode (batch statistics: the same as inside the call).
    branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
    short = shortcut(x)
    through = [
        torch.allclose(o, torch.relu(b / 0.5 + i), atol=1e-5)
        for o, b, i in zip(out, branch, short, strict=True)
    ]
    skipped = [torch.allclose(o, torch.relu(i), atol=1e-6) for o, i in zip(out, short, strict=True)]
    assert all(t or s for t, s in zip(through, skipped, strict=True))
    assert 10 < sum(skipped) < 54  # both happen: about half of 64 are dropped

    torch.manual_seed(0)
    dropping = R.resnet20(num_classes=3, drop_path=0.5).eval()
    torch.manual_seed(0)
    plain_depth = R.resnet20(num_classes=3).eval()
    dropping.load_state_dict(plain_depth.state_dict())  # no parameters of its own
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(dropping(x), plain_depth(x), rtol=0, atol=0)


# -- every network can learn ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depth": 20},
        {"depth": 20, "residual": False},
        {"arch": "resnet18", "width": 0.25, "stem": "small"},
        {"depth": 20, "drop_path": 0.2},
    ],
    ids=["resnet20", "plain20", "resnet18-small", "resnet20-drop-path"],
)
def test_overfits_one_small_batch(kwargs):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 32, 32)
    y = torch.arange(16) % 4
    model = build_resnet(num_classes=4, **kwargs).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        if loss.item() < 0.01:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.01
    assert (logits.argmax(1) == y).all()


# -- errors and the saved config --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 21}, r"depth=21 is not of the form 6n\+2 \(20, 32, .*choose one of those"),
        ({"depth": 2}, r"depth=2 is not of the form 6n\+2"),
        ({"shortcut": "D"}, r"shortcut='D' must be one of 'A', 'B', 'C'"),
        ({"arch": "resnet19"}, r"arch='resnet19' must be one of 'cifar', 'resnet18'"),
        ({"stem": "big"}, r"stem='big' must be one of 'imagenet', 'small'"),
        ({"width": 0}, r"width=0 must be a positive number"),
        ({"width": 0.01}, r"width=0.01 leaves .* use width >= 0.0625"),
        ({"num_classes": 0}, r"num_classes=0 must be a positive integer"),
        ({"in_channels": 1.5}, r"in_channels=1.5 must be a positive integer"),
        (
            {"residual": False, "zero_init_residual": True},
            r"zero_init_residual=True needs residual=True.*set zero_init_residual=False",
        ),
        (
            {"residual": False, "drop_path": 0.2},
            r"drop_path=0.2 needs residual=True: .*the plain twin has none; set drop_path=0",
        ),
        ({"drop_path": 1.0}, r"drop_path=1.0 must be in \[0, 1\)"),
        ({"drop_path": -0.1}, r"drop_path=-0.1 must be in \[0, 1\)"),
        ({"drop_path": "0.2"}, r"drop_path='0.2' must be a number in \[0, 1\)"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, match):
    kwargs = {"num_classes": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_resnet(**kwargs)


@pytest.mark.parametrize(
    "builder",
    [
        partial(R.resnet20, shortcut="A", zero_init_residual=True),
        partial(R.resnet20, residual=False, width=1.5),
        partial(R.resnet18, in_channels=2, stem="imagenet", width=0.25),
        partial(R.resnet50, shortcut="C", width=0.25),
        partial(R.resnet32, drop_path=0.2),
    ],
)
def test_config_rebuilds_a_model_that_loads_the_state_dict_strictly(builder):
    torch.manual_seed(0)
    model = builder(num_classes=7).eval()
    config = json.loads(json.dumps(model.config))  # what a bundle stores
    rebuilt = build_resnet(**config).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict
    assert rebuilt.config == model.config
    x = torch.randn(2, config["in_channels"], 20, 12)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
