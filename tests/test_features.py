import json
from pathlib import Path

import librosa
import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, config_keys
from pipeline.features.stft import (
    Normalizer,
    STFTImage,
    STFTParams,
    auto_sizes,
    compute_images,
    make_window,
    stft_image,
)
from pipeline.features.store import ImageFile
from pipeline.frontend import Frontend
from tests.conftest import extracted

REPO = Path(__file__).resolve().parents[1]


def params(**kw):
    base = dict(
        n_fft=256,
        hop_length=64,
        win_length=200,
        window="hann",
        center=True,
        pad_mode="reflect",
        power=1,
        scale="magnitude",
        top_db=None,
        size=None,
    )
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
    check_names(lambda: params(**kw), match)


def check_names(make, match: str) -> None:
    """``make()`` names the fields (a notebook's STFTParams(n_fft=0)); under the task
    layer's ``config_keys`` the same error names the config keys (``features.n_fft=0``)."""
    with pytest.raises(ConfigError, match="^" + match.replace("features.", "")):
        make()
    with pytest.raises(ConfigError, match="^" + match), config_keys("features."):
        make()


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
    with pytest.raises(ConfigError, match="^mode='minmax'"):
        Normalizer.fit(train, mode="minmax")
    normalize = config_keys("features.", names={"mode": "features.normalize"})
    with pytest.raises(ConfigError, match="^features.normalize='minmax'"), normalize:
        Normalizer.fit(train, mode="minmax")


# --- mel filterbank and frequency range --------------------------------------------------------


@pytest.mark.parametrize("mel_scale,norm", [("htk", None), ("slaney", "slaney"), ("htk", "slaney")])
def test_mel_matches_librosa_melspectrogram(mel_scale, norm):
    x = np.random.default_rng(4).standard_normal(4001).astype(np.float32)
    p = params(
        power=2,
        sample_rate=8000,
        n_mels=40,
        f_min=30.0,
        f_max=3800.0,
        mel_scale=mel_scale,
        norm=norm,
    )
    ours = compute_images(x[None, None], p, progress=False)[0, 0]
    ref = librosa.feature.melspectrogram(
        y=x,
        sr=8000,
        n_fft=256,
        hop_length=64,
        win_length=200,
        window="hann",
        center=True,
        pad_mode="reflect",
        power=2.0,
        n_mels=40,
        fmin=30.0,
        fmax=3800.0,
        htk=mel_scale == "htk",
        norm=norm,
    )
    assert ours.shape == ref.shape == (40, p.n_frames(4001)) == p.image_shape(4001)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.max())


def test_a_linear_frequency_range_crops_the_bins():
    x = np.random.default_rng(5).standard_normal(2000).astype(np.float32)
    p = params(sample_rate=8000, f_min=500.0, f_max=2000.0)  # bins are 31.25 Hz apart
    ours = compute_images(x[None, None], p, progress=False)[0, 0]
    full = np.abs(librosa.stft(x, n_fft=256, hop_length=64, win_length=200, pad_mode="reflect"))
    assert p.bins() == (16, 64) and ours.shape == (49, p.n_frames(2000)) == p.image_shape(2000)
    np.testing.assert_allclose(ours, full[16:65], rtol=1e-4, atol=1e-4 * full.max())
    # f_min=0 and f_max=null keep every bin, with or without the rate
    assert params(sample_rate=8000).n_freq() == params().n_freq() == 129


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"n_mels": 0}, "features.n_mels=0 must be a positive integer, or null"),
        ({"n_mels": 128, "sample_rate": 4000}, "features.n_mels=128 is too many for n_fft=256"),
        ({"f_max": 5000.0, "sample_rate": 8000}, "features.f_max=5000.0 is above the Nyquist"),
        ({"f_min": 300.0, "f_max": 200.0}, "features.f_max=200.0 must be above features.f_min"),
        (
            {"f_min": 100.0, "f_max": 110.0, "sample_rate": 8000},
            r"features.f_min=100.0 to f_max=110.0 Hz holds no FFT bin .* at n_fft=256\); widen "
            "the range or raise n_fft",
        ),
        ({"mel_scale": "bark"}, "features.mel_scale='bark' must be one of"),
        ({"norm": "area"}, "features.norm='area' must be null or 'slaney'"),
    ],
)
def test_bad_band_settings_name_the_key(kw, match):
    check_names(lambda: params(**kw), match)


def test_every_setting_is_written_in_each_preset():
    from omegaconf import OmegaConf

    fields = set(STFTParams.__dataclass_fields__) - {"sample_rate"}  # the data's working rate
    for preset in sorted((REPO / "conf" / "features").glob("*.yaml")):
        written = set(OmegaConf.load(preset))
        assert fields <= written, f"{preset.name} leaves {sorted(fields - written)} to a default"


def test_a_bundle_rebuilds_the_training_front_end(tmp_path):
    from pipeline.bundle import load_bundle, save_bundle
    from pipeline.models.svm import SVMClassifier

    x = np.random.default_rng(6).standard_normal((6, 1, 4000)).astype(np.float32)
    p = params(
        power=2,
        scale="db",
        top_db=80.0,
        sample_rate=8000,
        n_mels=32,
        f_min=50.0,
        f_max=3500.0,
        mel_scale="slaney",
        norm="slaney",
        size=(24, 16),
    )
    train = compute_images(x, p, progress=False)
    data = {
        "sample_rate": 8000,
        "channels": "mix",
        "segment_samples": 4000,
        "hop_samples": 4000,
        "pad": True,
    }
    model = SVMClassifier(C=[1.0], gamma=["scale"], cv=2).fit(train, np.arange(6) % 2)
    save_bundle(
        tmp_path / "b",
        model,
        classes=["a", "b"],
        frontend=Frontend.from_settings(data, p, Normalizer.fit(train, mode="per_freq")),
    )
    bundle = load_bundle(tmp_path / "b")
    assert bundle.features == p
    front = STFTImage(bundle.features)
    np.testing.assert_array_equal(front(torch.from_numpy(x)).numpy(), train)


# --- automatic sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "samples,rate,sizes,shape",
    [
        (150, 100, (16, 4, 16), (9, 38)),  # a short sensor trace: a smaller hop keeps 32 frames
        (8000, 8000, (512, 256, 512), (257, 32)),  # one second of 8 kHz audio
        (4000, 4000, (256, 128, 256), (129, 32)),  # the embedded default
        (441000, 44100, (2048, 1024, 2048), (1025, 431)),  # ten seconds of CD audio
    ],
)
def test_auto_sizes_give_a_usable_image(samples, rate, sizes, shape):
    auto = {"n_fft": "auto", "hop_length": "auto", "win_length": "auto"}
    assert auto_sizes(segment_samples=samples, sample_rate=rate, **auto) == sizes
    p = params(**dict(zip(("n_fft", "hop_length", "win_length"), sizes, strict=True)))
    assert p.image_shape(samples) == shape and shape[1] >= 16
    if samples <= 8000:
        x = np.random.default_rng(7).standard_normal((2, 1, samples)).astype(np.float32)
        assert compute_images(x, p, progress=False).shape == (2, 1, *shape)


def test_auto_fills_only_what_is_auto():
    kw = {"segment_samples": 8000, "sample_rate": 8000}
    assert auto_sizes(**kw, n_fft=256, hop_length="auto", win_length="auto") == (256, 128, 256)
    assert auto_sizes(**kw, n_fft="auto", hop_length=100, win_length=1000) == (1024, 100, 1000)
    assert auto_sizes(**kw, n_fft=64, hop_length=16, win_length=48) == (64, 16, 48)


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def test_auto_is_resolved_where_the_window_length_is_known(caplog):
    from pipeline.tasks.compare import stft_params

    cfg = compose("features.n_fft=auto", "features.hop_length=auto", "features.win_length=auto")
    with caplog.at_level("INFO", logger="pipeline.tasks.compare"):
        p = stft_params(cfg, sample_rate=8000, segment_samples=8000)
    assert (p.n_fft, p.hop_length, p.win_length, p.sample_rate) == (512, 256, 512, 8000)
    assert "n_fft=auto -> 512, hop_length=auto -> 256, win_length=auto -> 512" in caplog.text
    with pytest.raises(ConfigError, match="n_fft='big' must be a positive integer or auto"):
        stft_params(compose("features.n_fft=big"))
    mel = stft_params(compose("features=mel"), sample_rate=4000, segment_samples=4000)
    assert (mel.n_mels, mel.n_fft, mel.image_shape(4000)) == (40, 256, (40, 32))


# --- the disk cache ----------------------------------------------------------------------------


SETTINGS = {"sample_rate": 1000, "segment": {"length": 500}, "features": params().to_dict()}


def test_a_second_lookup_loads_the_entry_without_extracting(tmp_path, files, caplog):
    from pipeline.features.cache import cached

    root, ex, calls = tmp_path / "cache", extracted(), []

    def compute(_folder):
        calls.append(1)
        return ex, {"resolved": [1, 2]}

    def must_not_run(_folder):
        raise AssertionError("a cache hit must not extract")

    with caplog.at_level("INFO", logger="pipeline.features.cache"):
        first = cached(compute, root=root, files=files, settings=SETTINGS)
        key = first.key
        assert not first.hit and calls == [1] and f"feature cache miss {key}" in caplog.text
        second = cached(must_not_run, root=root, files=files, settings=SETTINGS)
    assert second.hit and second.key == key and f"feature cache hit {key}" in caplog.text
    assert first.info == second.info == {"resolved": [1, 2]}
    assert isinstance(second.extracted.images, ImageFile)  # read from disk by rows
    assert second.extracted.images.dtype == np.float32  # the dtype it was given
    for got in (first.extracted, second.extracted):
        np.testing.assert_array_equal(got.images, ex.images)
        for name in ("record", "start", "split", "file_samples", "file_rates"):
            np.testing.assert_array_equal(getattr(got, name), getattr(ex, name))
        assert got.skipped == ex.skipped
    assert sorted(p.name for p in root.iterdir()) == [key]  # no temporary folder is left
    # without a cache every call extracts
    uncached = cached(compute, root=None, files=files, settings=SETTINGS)
    assert uncached.key is None and not uncached.hit and calls == [1, 1]


ALTERED = {
    "n_fft": 512,
    "hop_length": 32,
    "win_length": 128,
    "window": "hamming",
    "center": False,
    "pad_mode": "constant",
    "power": 2,
    "scale": "db",
    "top_db": 60.0,
    "size": [32, 16],
    "sample_rate": 8000,
    "n_mels": 20,
    "f_min": 20.0,
    "f_max": 3000.0,
    "mel_scale": "slaney",
    "norm": "slaney",
    "lifter": 12,
    "dtype": "float16",
}


def test_every_feature_and_data_setting_changes_the_key(files):
    from pipeline.features.cache import cache_key

    base = cache_key(files=files, settings=SETTINGS)
    assert cache_key(files=files, settings=json.loads(json.dumps(SETTINGS))) == base
    assert set(ALTERED) == set(STFTParams.__dataclass_fields__)
    keys = {base}
    for field, value in ALTERED.items():
        assert SETTINGS["features"][field] != value
        changed = {**SETTINGS, "features": {**SETTINGS["features"], field: value}}
        keys.add(cache_key(files=files, settings=changed))
    for data_change in ({"sample_rate": 2000}, {"segment": {"length": 250}}, {"read": "all"}):
        keys.add(cache_key(files=files, settings={**SETTINGS, **data_change}))
    keys.add(cache_key(files=files[:2], settings=SETTINGS))
    keys.add(cache_key(files=files[::-1], settings=SETTINGS))
    assert len(keys) == 1 + len(ALTERED) + 3 + 2


def test_touching_or_rewriting_a_file_changes_the_key(files):
    import os

    from pipeline.features.cache import cache_key

    before = cache_key(files=files, settings=SETTINGS)
    st = os.stat(files[1])
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    touched = cache_key(files=files, settings=SETTINGS)
    assert touched != before
    np.save(files[1], np.zeros(600, np.float32))  # a new size
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache_key(files=files, settings=SETTINGS) not in (before, touched)


def test_a_half_written_or_damaged_entry_is_never_trusted(tmp_path, files, caplog):
    import os
    import time

    from pipeline.features.cache import STALE_SECONDS, cache_key, cached

    root, ex = tmp_path / "cache", extracted()
    key = cache_key(files=files, settings=SETTINGS)
    # an interrupted run's temporary folder (a stale one and one still being written)
    for name in (f".{key}.old.tmp", f".{key}.now.tmp"):
        (root / name).mkdir(parents=True)
        np.save(root / name / "images.npy", np.zeros((2, 1, 6, 4), np.float32))
        (root / name / "meta.json").write_text(json.dumps({"format_version": 1, "key": key}))
    old = time.time() - 2 * STALE_SECONDS
    os.utime(root / f".{key}.old.tmp", (old, old))
    got = cached(lambda _folder: (ex, {}), root=root, files=files, settings=SETTINGS)
    assert not got.hit and got.extracted.images.shape == ex.images.shape
    assert sorted(p.name for p in root.iterdir()) == sorted([key, f".{key}.now.tmp"])
    # an entry whose files were damaged by hand is recomputed, with a warning
    (root / key / "images.npy").write_bytes(b"\x93NUMPY garbage")
    with caplog.at_level("WARNING", logger="pipeline.features.cache"):
        again = cached(lambda _folder: (ex, {}), root=root, files=files, settings=SETTINGS)
    assert not again.hit and "is unreadable" in caplog.text
    np.testing.assert_array_equal(again.extracted.images, ex.images)


def test_a_cache_dir_that_is_a_file_is_a_config_error(tmp_path, files):
    from pipeline.features.cache import cached

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="features.cache_dir=.* is a file, not a folder"):
        cached(
            lambda _folder: (extracted(), {}),
            root=tmp_path / "file",
            files=files,
            settings=SETTINGS,
        )


def test_prepare_data_reuses_the_images_and_applies_the_current_split(
    tmp_path, tone_dataset, monkeypatch
):
    import pipeline.tasks.compare as compare

    overrides = (
        "data=folder",
        f"data.root={tone_dataset}",
        "data.sample_rate=1000",
        "features.n_fft=auto",
        "features.hop_length=auto",
        "features.win_length=auto",
        f"features.cache_dir={tmp_path / 'cache'}",
    )
    first = compare.prepare_data(compose(*overrides), device="cpu", progress=False)
    params = first.frontend.params
    assert not first.cache_hit and (params.n_fft, params.hop_length) == (32, 16)

    def no_extraction(*args, **kwargs):
        raise AssertionError("the second run must load the images from the cache")

    monkeypatch.setattr(compare, "extract_images", no_extraction)
    monkeypatch.setattr(compare, "probe_length", no_extraction)  # a hit opens no file
    second = compare.prepare_data(compose(*overrides), device="cpu", progress=False)
    assert second.cache_hit and second.cache_key == first.cache_key
    assert second.frontend == first.frontend
    np.testing.assert_array_equal(second.extracted.images, first.extracted.images)
    np.testing.assert_array_equal(second.extracted.split, first.extracted.split)
    # another split seed gives other splits from the same entry
    reseeded = compare.prepare_data(
        compose(*overrides, "data.split_seed=5"), device="cpu", progress=False
    )
    assert reseeded.cache_hit
    assert not np.array_equal(reseeded.extracted.split, first.extracted.split)
    # a feature setting is part of the key
    with pytest.raises(AssertionError, match="must load the images"):
        compare.prepare_data(compose(*overrides, "features.top_db=6"), device="cpu", progress=False)


def test_the_benchmark_runs_and_prints_its_ratios(capsys):
    import re

    from pipeline.bench.__main__ import main

    assert (
        main(["features", "--n", "12", "--length", "1000", "--repeats", "1", "--files", "6"]) == 0
    )
    out = capsys.readouterr().out
    rates = {k: float(v) for k, v in re.findall(r"(ours|librosa|scipy)\s+([\d.]+) signals/s", out)}
    assert set(rates) == {"ours", "librosa", "scipy"} and all(v > 0 for v in rates.values())
    ratio = float(re.search(r"ratio ours/\w+ \(the faster reference\): ([\d.]+)", out)[1])
    assert abs(ratio - rates["ours"] / max(rates["librosa"], rates["scipy"])) < 0.02 * ratio + 0.01
    assert re.search(r"ratio first/hit \(feature stage\): [\d.]+", out)


def test_per_image_standardisation_makes_images_gain_invariant():
    import torch

    from pipeline.features.stft import Normalizer

    rng = np.random.default_rng(0)
    images = rng.normal(-40, 10, (32, 1, 8, 6)).astype(np.float32)
    louder = images + 20.0  # +20 dB: the same recordings, ten times the amplitude
    norm = Normalizer.fit(images, mode="per_freq", per_image=True)
    np.testing.assert_allclose(norm(images), norm(louder), atol=1e-4)
    torch_out = norm.torch(torch.from_numpy(louder)).numpy()
    np.testing.assert_allclose(torch_out, norm(louder), atol=1e-4)
    again = Normalizer.from_dict(norm.to_dict())
    assert again.per_image and np.array_equal(again(images), norm(images))
    plain = Normalizer.fit(images, mode="global")
    assert not plain.per_image
    assert not np.allclose(plain(images), plain(louder), atol=1e-2)


def test_per_image_freq_mode_removes_a_fixed_channel_response():
    import torch

    from pipeline.features.stft import Normalizer

    rng = np.random.default_rng(1)
    images = rng.normal(-40, 10, (16, 1, 8, 6)).astype(np.float32)
    # Another microphone: a fixed gain per frequency row, in dB.
    coloured = images + rng.normal(0, 6, (1, 1, 8, 1)).astype(np.float32)
    norm = Normalizer.fit(images, mode="global", per_image="freq")
    np.testing.assert_allclose(norm(images), norm(coloured), atol=1e-4)
    torch_out = norm.torch(torch.from_numpy(coloured)).numpy()
    np.testing.assert_allclose(torch_out, norm(coloured), atol=1e-4)
    assert Normalizer.from_dict(norm.to_dict()).per_image == "freq"
    whole = Normalizer.fit(images, mode="global", per_image=True)
    assert not np.allclose(whole(images), whole(coloured), atol=1e-2)
    with pytest.raises(ConfigError, match=r"^per_image='rows' must be false, true"):
        Normalizer.fit(images, mode="global", per_image="rows")


def test_a_size_limit_evicts_the_least_recently_used_entries(tmp_path, files, caplog):
    import os

    from pipeline.features.cache import cached, entries

    root = tmp_path / "cache"

    def lookup(n, **kw):
        settings = {**SETTINGS, "n": n}
        return cached(
            lambda _folder: (extracted(seed=n), {}), root=root, files=files, settings=settings, **kw
        )

    keys = [lookup(n).key for n in range(3)]
    size = entries(root)[0][1]
    for i, key in enumerate(keys):  # used in the order 0, 1, 2, an hour apart
        os.utime(root / key / "meta.json", (1e9 + 3600 * i, 1e9 + 3600 * i))
    assert lookup(0).hit  # a hit makes entry 0 the most recently used
    with caplog.at_level("INFO", logger="pipeline.features.cache"):
        fourth = lookup(3, max_bytes=int(2.5 * size))
    left = {folder.name for folder, _, _ in entries(root)}
    assert left == {keys[0], fourth.key}  # 1 and 2 went, oldest use first
    assert "removed the least recently used entry" in caplog.text
    # The entry being written stays even when it alone is over the limit.
    fifth = lookup(4, max_bytes=1)
    assert {folder.name for folder, _, _ in entries(root)} == {fifth.key}
    assert np.array_equal(fifth.extracted.images, extracted(seed=4).images)


def test_per_group_centring_removes_each_groups_channel_and_keeps_the_classes():
    from pipeline.features.stft import Normalizer, group_profiles
    from pipeline.features.view import ImageView, centred_by_group

    rng = np.random.default_rng(2)
    content = rng.normal(0, 1, (30, 1, 8, 6)).astype(np.float32)
    groups = np.array(["ann", "bob", "cy"] * 10)
    # Each group's microphone: its own fixed gain per frequency row.
    channel = {g: rng.normal(0, 3, (1, 8, 1)).astype(np.float32) for g in ("ann", "bob", "cy")}
    images = content + np.stack([channel[g] for g in groups])
    profiles = group_profiles(images, groups)
    assert sorted(profiles) == ["ann", "bob", "cy"] and profiles["ann"].shape == (1, 8, 1)
    for g in profiles:
        expected = images[groups == g].mean(axis=(0, 3))[..., None]
        np.testing.assert_allclose(profiles[g], expected, atol=1e-5)
    centred = centred_by_group(ImageView(images, np.arange(30)), groups)[:].numpy()
    for g in profiles:
        np.testing.assert_allclose(centred[groups == g].mean(axis=(0, 3)), 0, atol=1e-5)
        # What differs between a group's images (the classes) is left as it was.
        np.testing.assert_allclose(
            centred[groups == g],
            content[groups == g] - content[groups == g].mean((0, 3), keepdims=True),
            atol=1e-4,
        )
    norm = Normalizer.fit(images, mode="global", per_image=True, per_group="freq")
    assert Normalizer.from_dict(norm.to_dict()).per_group == "freq"
    assert Normalizer.from_dict({**norm.to_dict(), "per_group": False}).per_group is False
    with pytest.raises(ConfigError, match=r"^per_group='speaker' must be false or freq"):
        Normalizer.fit(images, mode="global", per_group="speaker")


def _voice(f0: float, sr: int = 8000, seconds: float = 0.5) -> np.ndarray:
    """A vowel-like signal: harmonics of ``f0`` shaped by formants at 500, 1500 and 2500 Hz."""
    t = np.arange(int(sr * seconds)) / sr
    out = np.zeros_like(t)
    for k in range(1, int(sr / 2 / f0)):
        f = k * f0
        gain = sum(np.exp(-(((f - c) / 150.0) ** 2)) for c in (500.0, 1500.0, 2500.0))
        out += (gain + 1e-3) * np.sin(2 * np.pi * f * t)
    return out.astype(np.float32)


def test_lifter_keeps_the_first_cepstral_terms_like_scipys_dct():
    from scipy.fft import dct, idct

    x = np.random.default_rng(3).standard_normal((2, 1, 4000)).astype(np.float32)
    raw = params(power=2, scale="db", top_db=80.0, n_fft=512, hop_length=128, win_length=512)
    smooth = STFTParams(**{**raw.to_dict(), "size": None, "lifter": 20})
    before = compute_images(x, raw, progress=False)
    after = compute_images(x, smooth, progress=False)
    cepstrum = dct(before, type=2, norm="ortho", axis=-2)
    cepstrum[..., 20:, :] = 0
    np.testing.assert_allclose(after, idct(cepstrum, type=2, norm="ortho", axis=-2), atol=1e-3)
    # The kept terms are untouched: the MFCCs (librosa's, of the same dB image) are equal.
    mfcc = librosa.feature.mfcc(S=before[0, 0], n_mfcc=20, norm="ortho")
    np.testing.assert_allclose(
        librosa.feature.mfcc(S=after[0, 0], n_mfcc=20, norm="ortho"), mfcc, atol=1e-2
    )
    front = STFTImage(smooth)  # the module (predict's front end) gives the same image
    np.testing.assert_allclose(front(torch.from_numpy(x)).numpy(), after, atol=1e-4)


def test_lifter_removes_pitch_harmonics_and_keeps_the_formants():
    x = np.stack([_voice(100.0), _voice(140.0)])[:, None]
    kw = dict(n_fft=512, hop_length=128, win_length=512, power=2, scale="db", top_db=80.0)
    raw = compute_images(x, params(**kw), progress=False).mean(-1)[:, 0]  # (2, 257) profiles
    smooth = compute_images(x, params(**kw, lifter=16), progress=False).mean(-1)[:, 0]

    # Two pitches, one vocal tract: the harmonic ripple makes the raw profiles differ (their
    # levels differ too, a gain that per_image removes, so each profile is centred first).
    def gap(a):
        a = a - a.mean(-1, keepdims=True)
        return np.abs(a[0] - a[1]).mean()

    assert gap(smooth) < 0.3 * gap(raw)
    # The formant peaks stay where they were (bins are 15.6 Hz apart).
    hz = np.arange(257) * 8000 / 512
    for centre in (500.0, 1500.0, 2500.0):
        band = (hz > centre - 400) & (hz < centre + 400)
        assert abs(hz[band][np.argmax(smooth[0][band])] - centre) < 100


def test_lifter_settings_are_checked_and_round_trip():
    check_names(lambda: params(scale="db", power=2, lifter=0), "features.lifter=0 must be a")
    check_names(
        lambda: params(lifter=20),  # magnitude scale
        "features.lifter=20 smooths a log spectrum, but features.scale='magnitude'; set scale "
        "to db or log1p, or lifter to null",
    )
    with pytest.raises(ConfigError, match=r"^lifter=129 keeps every one of the 129"):
        params(scale="db", power=2, lifter=129, sample_rate=8000)
    # Before the data is read (no rate), a linear axis's height may still change (auto sizes).
    assert params(scale="db", power=2, lifter=129).lifter == 129
    with pytest.raises(ConfigError, match=r"^lifter=40 keeps every one of the 40"):
        params(scale="db", power=2, lifter=40, n_mels=40)
    p = params(scale="db", power=2, lifter=20)
    assert STFTParams.from_dict(p.to_dict()) == p
