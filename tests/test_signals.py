import numpy as np
import pytest
import scipy.io
import soundfile as sf

from pipeline.errors import ConfigError, SignalError
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


def test_channel_axis_overrides_the_shorter_axis_rule(tmp_path):
    x = np.arange(12 * 9, dtype=np.float64).reshape(12, 9) + 1  # 12 channels of 9 samples
    np.save(tmp_path / "wide.npy", x)
    np.savez(tmp_path / "wide.npz", x=x)
    scipy.io.savemat(tmp_path / "wide.mat", {"x": x})
    for name in ("wide.npy", "wide.npz", "wide.mat"):
        auto = read_signal(tmp_path / name, sample_rate=100, channels="all")
        assert auto.samples.shape == (9, 12)  # the old rule: more rows than columns
        first = read_signal(tmp_path / name, sample_rate=100, channels="all", channel_axis="first")
        assert first.samples.shape == (12, 9)
        np.testing.assert_array_equal(first.samples, x)
        last = read_signal(tmp_path / name, sample_rate=100, channels="all", channel_axis="last")
        np.testing.assert_array_equal(last.samples, x.T)
    (tmp_path / "t.csv").write_text("\n".join(",".join(f"{v:g}" for v in row) for row in x))
    csv = read_signal(tmp_path / "t.csv", sample_rate=100, channels="all", channel_axis="first")
    assert csv.samples.shape == (9, 12)  # a table's columns are its channels, always
    with pytest.raises(ConfigError, match=r"data.channel_axis='rows' must be one of auto, first"):
        read_signal(tmp_path / "wide.npy", sample_rate=100, channel_axis="rows")


def test_mat_key_field_path_reads_a_struct_field(tmp_path):
    gs = np.sin(np.arange(2000.0) / 7)[:, None]  # MFPT keeps the signal in bearing.gs
    path = tmp_path / "baseline_1.mat"
    scipy.io.savemat(path, {"bearing": {"gs": gs, "sr": 48828, "load": 270}})
    sig = read_signal(path, sample_rate=48828, mat_key="bearing.gs")
    assert sig.samples.shape == (1, 2000)
    np.testing.assert_allclose(sig.samples[0], gs[:, 0], rtol=1e-6)
    # the first part is a regex over variable names, the fields are exact
    assert read_signal(path, sample_rate=48828, mat_key="^bear.gs").samples.shape == (1, 2000)
    with pytest.raises(SignalError, match=r"struct bearing has no field 'xs'; its fields are "):
        read_signal(path, sample_rate=48828, mat_key="bearing.xs")
    with pytest.raises(SignalError, match=r"bearing.sr is the scalar 48828, not a numeric array"):
        read_signal(path, sample_rate=48828, mat_key="bearing.sr")
    with pytest.raises(SignalError, match=r"matches no struct variable among .*\['bearing'\]"):
        read_signal(path, sample_rate=48828, mat_key="shaft.gs")
    with pytest.raises(SignalError, match=r"field path such as data.mat_key=bearing.gs"):
        read_signal(path, sample_rate=48828)  # no numeric variable: the hint names the path
    nested = tmp_path / "nested.mat"
    scipy.io.savemat(nested, {"a": {"b": {"c": gs * 2}}, "X097_DE_time": gs})
    np.testing.assert_allclose(
        read_signal(nested, sample_rate=1, mat_key="a.b.c").samples[0], 2 * gs[:, 0], rtol=1e-6
    )
    with pytest.raises(SignalError, match=r"ends at a struct, a.b, with fields \['c'\]"):
        read_signal(nested, sample_rate=1, mat_key="a.b")
    plain = read_signal(nested, sample_rate=1, mat_key="DE_time")  # still a regex
    np.testing.assert_allclose(plain.samples[0], gs[:, 0], rtol=1e-6)


def test_mat_v73_field_path_walks_groups(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "v73.mat"
    x = np.cos(np.arange(300.0))
    with h5py.File(path, "w", userblock_size=512) as f:
        f["bearing/gs"] = x[None, :]  # a struct is a group; (300, 1) stored reversed
        f["bearing/sr"] = np.array([[48828.0]])
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116, b" ")
    with open(path, "r+b") as f:
        f.write(header + b"\x00" * 8 + b"\x00\x02" + b"IM")
    sig = read_signal(path, sample_rate=100, mat_key="bearing.gs")
    np.testing.assert_allclose(sig.samples[0], x, rtol=1e-6)
    with pytest.raises(SignalError, match=r"has no field 'xs'; its fields are \['gs', 'sr'\]"):
        read_signal(path, sample_rate=100, mat_key="bearing.xs")
    with h5py.File(path, "a") as f:
        # a cell array: a dataset of references to the data elsewhere
        f["bearing/refs"] = np.array([f["bearing/gs"].ref] * 2, dtype=h5py.ref_dtype)
    with pytest.raises(SignalError, match=r"stored as references, which this reader does not"):
        read_signal(path, sample_rate=100, mat_key="bearing.refs")


def test_random_bytes_and_float32_overflow_raise_signal_error(tmp_path):
    rng = np.random.default_rng(0)
    noise = np.frombuffer(rng.bytes(4 * 2 * 4000), np.float32).reshape(4000, 2)
    np.save(tmp_path / "bytes.npy", noise)  # some bit patterns are NaN or inf
    with pytest.raises(SignalError, match=r"bytes.npy: the signal holds \d+ NaN or infinite"):
        read_signal(tmp_path / "bytes.npy", sample_rate=1000)
    # Huge finite values: a float32 mean of two channels near 3e38 would be inf.
    huge = np.full((2, 1000), 3e38, np.float32)
    np.save(tmp_path / "huge.npy", huge)
    mixed = read_signal(tmp_path / "huge.npy", sample_rate=1000, channels="mix")
    np.testing.assert_allclose(mixed.samples, huge[:1], rtol=1e-6)
    # A square wave at 3.3e38: the resampling filter's overshoot leaves float32's range.
    square = np.where(np.arange(4000) // 100 % 2, 3.3e38, -3.3e38).astype(np.float32)
    sf.write(tmp_path / "square.wav", square, 8000, subtype="FLOAT")
    overflow = r"square.wav: peak magnitude 3.3e\+38 leaves float32's range"
    with pytest.raises(SignalError, match=overflow) as info:
        read_signal(tmp_path / "square.wav", sample_rate=16000)
    assert "after resampling from 8000 Hz to 16000 Hz" in str(info.value)
