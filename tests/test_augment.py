import pytest
import torch

from pipeline.augment import (
    AugmentSettings,
    SpecAugment,
    channel_response,
    mixup,
    stretch,
    time_shift,
)
from pipeline.errors import ConfigError


def test_masks_cover_whole_rows_and_columns_per_image():
    torch.manual_seed(0)
    x = torch.ones(64, 1, 16, 12)
    out = SpecAugment(AugmentSettings(freq_mask=4, time_mask=3))(x)
    rows = (out == 0).all(dim=3).sum(dim=(1, 2))  # fully masked rows per image
    cols = (out == 0).all(dim=2).sum(dim=(1, 2))  # fully masked columns per image
    assert rows.max() <= 4 and cols.max() <= 3
    assert rows.float().mean() > 0.5 and cols.float().mean() > 0.3
    masked = out == 0
    # each image draws its own masks
    assert not all(torch.equal(masked[0], masked[i]) for i in range(1, 64))


def test_time_shift_rolls_each_image_along_time():
    torch.manual_seed(0)
    x = torch.arange(8.0).repeat(5, 2, 3, 1)  # (5, 2, 3, 8), column j holds j
    out = time_shift(x, 0.5)
    for img, shifted in zip(x, out, strict=True):
        k = int((shifted[0, 0, 0] - img[0, 0, 0]).item()) % 8
        assert torch.equal(shifted, torch.roll(img, -k, dims=-1))
    assert torch.equal(time_shift(x, 0.0), x)


def test_stretch_scales_each_image_about_the_lowest_row_and_first_column():
    torch.manual_seed(0)
    rows = torch.arange(32.0)[:, None].expand(32, 20)  # value = row index
    x = rows.repeat(16, 1, 1, 1)  # (16, 1, 32, 20)
    out = stretch(x, freq=0.2, time=0.0)
    # Bilinear sampling of a ramp is exact: output row j reads input row (j + 0.5) / a - 0.5.
    j = 4
    factors = (j + 0.5) / (out[:, 0, j, 0] + 0.5)
    assert ((factors >= 0.8 - 1e-4) & (factors <= 1.2 + 1e-4)).all()
    assert factors.std() > 0.05  # each image its own factor
    expected = ((torch.arange(32.0) + 0.5)[None, :] / factors[:, None] - 0.5).clamp(0, 31)
    assert torch.allclose(out[:, 0, :, 0], expected, atol=1e-4)
    assert torch.allclose(out[..., :1].expand_as(out), out, atol=1e-5)  # time untouched
    cols = torch.arange(20.0).repeat(16, 1, 32, 1)  # value = column index
    along_time = stretch(cols, freq=0.0, time=0.3)
    factors = 2.5 / (along_time[:, 0, 0, 2] + 0.5)
    assert ((factors >= 0.7 - 1e-4) & (factors <= 1.3 + 1e-4)).all()
    assert torch.allclose(stretch(x, freq=0.0, time=0.0), x)
    with pytest.raises(ConfigError, match=r"train.augment.freq_warp=1.5 must be a fraction"):
        AugmentSettings(freq_warp=1.5)


def test_channel_response_adds_one_smooth_curve_along_frequency_per_image():
    torch.manual_seed(0)
    x = torch.randn(32, 1, 40, 12)
    out = channel_response(x, 0.5)
    curve = out - x
    # The same gain per band at every instant, and no overall offset added.
    assert torch.allclose(curve, curve[..., :1].expand_as(curve), atol=1e-6)
    c = curve[:, 0, :, 0]  # (images, rows)
    assert c.abs().max() <= 0.5 * (1 + 1 / 2 + 1 / 3) + 1e-6
    assert c.mean(dim=1).abs().max() < 0.05  # cosines k >= 1 average to about 0 over rows
    assert c.std(dim=0).mean() > 0.1  # each image its own curve
    assert (c.diff(dim=1).abs().max(dim=1).values < 0.2).all()  # smooth: small row steps
    on = SpecAugment(AugmentSettings(channel=0.5))(x)
    assert AugmentSettings(channel=0.5).any_image and not torch.allclose(on, x)
    assert torch.equal(channel_response(x, 0.0), x)
    with pytest.raises(ConfigError, match=r"train.augment.channel=-1 must be 0 \(off\)"):
        AugmentSettings(channel=-1)


def test_mixup_is_a_convex_combination_of_two_images():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 4, 4)
    y = torch.arange(16)
    mixed, y_other, lam = mixup(x, y, 0.4)
    assert 0 <= lam <= 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[y_other], atol=1e-6)
