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
    np.save(tmp_path / "a.npy", np.ones((500, 3), np.float64))  # tall: (samples, channels)
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
    sf.write(tmp_path / "m.wav", np.full(100, 0.1, np.float32), 1000)
    with pytest.raises(SignalError, match=r"has 1 channel\(s\), so data.channels=\[3\]"):
        read_signal(tmp_path / "m.wav", sample_rate=1000, channels=[3])


def test_npz_picks_the_only_array_or_the_named_key(tmp_path):
    np.savez(tmp_path / "one.npz", x=np.arange(1, 11, dtype=np.float32))
    assert read_signal(tmp_path / "one.npz", sample_rate=10).samples.shape == (1, 10)
    np.savez(tmp_path / "two.npz", acc=np.ones((3, 50)), time=np.arange(50.0))
    with pytest.raises(SignalError, match=r"pick one of its arrays \['acc', 'time'\]"):
        read_signal(tmp_path / "two.npz", sample_rate=10)
    sig = read_signal(tmp_path / "two.npz", sample_rate=10, npz_key="acc", channels="all")
    assert sig.samples.shape == (3, 50)


@pytest.mark.parametrize("delimiter", [",", ";", "\t", " "])
def test_text_tables_with_or_without_header(tmp_path, delimiter):
    rows = np.column_stack([np.arange(1, 21), np.arange(1, 21) * 10.0])
    body = "\n".join(delimiter.join(f"{v:g}" for v in row) for row in rows)
    (tmp_path / "plain.csv").write_text(body + "\n")
    (tmp_path / "named.txt").write_text(delimiter.join(["time", "accel"]) + "\n" + body + "\n")
    plain = read_signal(tmp_path / "plain.csv", sample_rate=1, channels="all")
    assert plain.samples.shape == (2, 20)
    named = read_signal(
        tmp_path / "named.txt", sample_rate=1, channels="all", csv_columns=["accel"]
    )
    np.testing.assert_array_equal(named.samples[0], rows[:, 1])
    by_index = read_signal(tmp_path / "named.txt", sample_rate=1, channels="all", csv_columns=[1])
    np.testing.assert_array_equal(by_index.samples, named.samples)
    with pytest.raises(SignalError, match="no column named 'gyro'"):
        read_signal(tmp_path / "named.txt", sample_rate=1, csv_columns=["gyro"])


def test_text_that_is_not_numeric_is_reported(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\nx,y\n")
    with pytest.raises(SignalError, match="not a table of numbers"):
        read_signal(tmp_path / "bad.csv", sample_rate=1)


def test_mat_key_is_a_regex_over_variable_names(tmp_path):
    de = np.sin(np.arange(1000.0))[:, None]  # MATLAB column vector (samples, 1)
    scipy_io = pytest.importorskip("scipy.io")
    scipy_io.savemat(
        tmp_path / "118.mat", {"X118_DE_time": de, "X118_FE_time": de * 2, "X118RPM": 1796}
    )
    sig = read_signal(tmp_path / "118.mat", sample_rate=12000, mat_key="DE_time")
    assert sig.samples.shape == (1, 1000)
    np.testing.assert_allclose(sig.samples[0], de[:, 0], rtol=1e-6)
    with pytest.raises(SignalError, match=r"data.mat_key='_time' matches 2 variables"):
        read_signal(tmp_path / "118.mat", sample_rate=12000, mat_key="_time")
    with pytest.raises(SignalError, match=r"matches no variable among .*'X118_DE_time'"):
        read_signal(tmp_path / "118.mat", sample_rate=12000, mat_key="BA_time")


def test_mat_v73_is_read_through_h5py(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "v73.mat"
    x = np.cos(np.arange(300.0))
    with h5py.File(path, "w", userblock_size=512) as f:
        f["accel"] = x[None, :]  # MATLAB's (300, 1) column vector, as HDF5 stores it
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116, b" ")
    with open(path, "r+b") as f:
        f.write(header + b"\x00" * 8 + b"\x00\x02" + b"IM")
    sig = read_signal(path, sample_rate=100)
    np.testing.assert_allclose(sig.samples[0], x, rtol=1e-6)


def test_silent_and_truncated_files(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(100, np.float32), 1000)
    with pytest.raises(SignalError, match="every sample is zero"):
        read_signal(tmp_path / "silent.wav", sample_rate=1000)
    sf.write(tmp_path / "full.wav", np.full(1000, 0.2, np.float32), 1000, subtype="FLOAT")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:30])  # the header alone, cut short
    with pytest.raises(SignalError):
        read_signal(tmp_path / "cut.wav", sample_rate=1000)
