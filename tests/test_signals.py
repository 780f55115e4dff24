import numpy as np
import pytest
import soundfile as sf

from pipeline.errors import SignalError
from pipeline.signals import read_signal


def test_wav_round_trip_shape_and_rate(tmp_path):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (800, 2)).astype(np.float32)
    path = tmp_path / "a.wav"
    sf.write(path, x, 8000, subtype="FLOAT")
    sig = read_signal(path, sample_rate=8000, channels="all")
    assert sig.samples.shape == (2, 800) and sig.samples.dtype == np.float32
    np.testing.assert_allclose(sig.samples, x.T)
    assert not sig.resampled
    mixed = read_signal(path, sample_rate=8000, channels="mix")
    np.testing.assert_allclose(mixed.samples[0], x.mean(axis=1), rtol=1e-6)
    picked = read_signal(path, sample_rate=8000, channels=[1])
    np.testing.assert_allclose(picked.samples[0], x[:, 1])


def test_audio_at_another_rate_is_resampled(tmp_path):
    t = np.arange(16000) / 16000
    path = tmp_path / "tone.flac"
    sf.write(path, 0.5 * np.sin(2 * np.pi * 440 * t), 16000)
    sig = read_signal(path, sample_rate=8000)
    assert sig.resampled and sig.source_rate == 16000 and sig.sample_rate == 8000
    assert sig.samples.shape == (1, 8000)
    spectrum = np.abs(np.fft.rfft(sig.samples[0]))
    assert np.argmax(spectrum) == 440  # 1 Hz bins at 8000 samples / 8000 Hz


def test_npy_takes_the_configured_rate_and_channel_layout(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((500, 3), np.float64))  # tall: (samples, channels)
    sig = read_signal(tmp_path / "a.npy", sample_rate=100, channels="all")
    assert sig.samples.shape == (3, 500) and sig.sample_rate == 100


@pytest.mark.parametrize(
    ("name", "write", "match"),
    [
        (
            "corrupt.wav",
            lambda p: p.write_bytes(b"RIFF\x00\x00garbage"),
            "not a readable audio file",
        ),
        ("empty.wav", lambda p: p.write_bytes(b""), "not a readable audio file"),
        ("nan.npy", lambda p: np.save(p, np.array([0.0, np.nan, 1.0])), "NaN or infinite"),
        ("none.npy", lambda p: np.save(p, np.zeros(0)), "holds no samples"),
        ("cube.npy", lambda p: np.save(p, np.zeros((2, 2, 2))), "not 1-D or 2-D"),
        ("a.xyz", lambda p: p.write_text("1,2"), "suffix '.xyz' is not supported"),
    ],
)
def test_bad_files_raise_signal_error_naming_the_file(tmp_path, name, write, match):
    path = tmp_path / name
    write(path)
    with pytest.raises(SignalError, match=match) as info:
        read_signal(path, sample_rate=1000)
    assert str(path) in str(info.value)


def test_missing_channel_is_reported(tmp_path):
    sf.write(tmp_path / "m.wav", np.zeros(100, np.float32), 1000)
    with pytest.raises(SignalError, match=r"has 1 channel\(s\), so data.channels=\[3\]"):
        read_signal(tmp_path / "m.wav", sample_rate=1000, channels=[3])
