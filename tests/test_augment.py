import torch

from pipeline.augment import AugmentSettings, SpecAugment, mixup, time_shift


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


def test_mixup_is_a_convex_combination_of_two_images():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 4, 4)
    y = torch.arange(16)
    mixed, y_other, lam = mixup(x, y, 0.4)
    assert 0 <= lam <= 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[y_other], atol=1e-6)
