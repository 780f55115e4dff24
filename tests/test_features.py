import librosa
import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.features.stft import Normalizer, STFTParams, compute_images, make_window, stft_image


def params(**kw):
    base = dict(
        n_fft=256, hop_length=64, win_length=200, window="hann", center=True, pad_mode="reflect",
        power=1, scale="magnitude", top_db=None, size=None,
    )  # fmt: skip
    return STFTParams(**{**base, **kw})


@pytest.mark.parametrize(
    "center,pad_mode", [(True, "reflect"), (True, "constant"), (False, "reflect")]
)
def test_magnitude_matches_librosa(center, pad_mode):
    x = np.random.default_rng(0).standard_normal(3001).astype(np.float32)
    p = params(center=center, pad_mode=pad_mode)
    ours = stft_image(torch.from_numpy(x)[None], make_window(p), p)[0].numpy()
    ref = np.abs(
        librosa.stft(
            x,
            n_fft=256,
            hop_length=64,
            win_length=200,
            window="hann",
            center=center,
            pad_mode=pad_mode,
        )
    )
    assert ours.shape == ref.shape == (129, p.n_frames(3001))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.max())


def test_db_scale_matches_librosa_power_to_db():
    x = np.random.default_rng(1).standard_normal(2000).astype(np.float32)
    p = params(power=2, scale="db", top_db=60.0)
    ours = stft_image(torch.from_numpy(x)[None], make_window(p), p)[0].numpy()
    stft = librosa.stft(
        x, n_fft=256, hop_length=64, win_length=200, window="hann", pad_mode="reflect"
    )
    power = np.abs(stft) ** 2  # librosa pads with zeros by default; torchaudio with reflect
    ref = librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=60.0)
    np.testing.assert_allclose(ours, ref, atol=1e-3)


@pytest.mark.parametrize("n", [255, 256, 1001, 1234])
def test_shapes_for_odd_lengths(n):
    p = params()
    image = stft_image(torch.zeros(2, n), make_window(p), p)
    assert image.shape == (2, 129, p.n_frames(n)) == (2, 129, 1 + n // 64)
    assert p.image_shape(n) == (129, 1 + n // 64)
    sized = params(size=(32, 16), scale="db", power=2, top_db=80.0)
    assert stft_image(torch.randn(3, 2, n), make_window(sized), sized).shape == (3, 2, 32, 16)


def test_a_batch_equals_its_items():
    x = np.random.default_rng(2).standard_normal((7, 2, 1500)).astype(np.float32)
    p = params(power=2, scale="db", top_db=80.0, size=(40, 20))
    batch = compute_images(x, p, batch_size=3, progress=False)
    for i in range(len(x)):
        one = compute_images(x[i : i + 1], p, progress=False)
        np.testing.assert_allclose(batch[i], one[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"n_fft": 0}, "features.n_fft=0 must be a positive integer"),
        ({"win_length": 300}, "features.win_length=300 must not exceed features.n_fft=256"),
        ({"window": "kaiser"}, "features.window='kaiser' must be one of"),
        ({"scale": "mel"}, "features.scale='mel' must be one of"),
        ({"size": (64,)}, r"features.size=\[64\] must be \[height, width\]"),
    ],
)
def test_bad_settings_name_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        params(**kw)


def test_normalizer_uses_training_statistics():
    rng = np.random.default_rng(3)
    train = rng.normal(5.0, 2.0, (50, 1, 8, 6)).astype(np.float32)
    norm = Normalizer.fit(train, mode="global")
    z = norm(train)
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    per = Normalizer.fit(train, mode="per_freq")
    assert per.mean.shape == (1, 8, 1)
    assert np.allclose(per(train).mean(axis=(0, 3)), 0, atol=1e-4)
    again = Normalizer.from_dict(per.to_dict())
    np.testing.assert_array_equal(again(train), per(train))
    with pytest.raises(ConfigError, match="features.normalize='minmax'"):
        Normalizer.fit(train, mode="minmax")
