import json

import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from pipeline.data.synthetic import (
    BEARING_6205,
    CLASSES,
    MARKER,
    bearing_frequencies,
    ensure_dataset,
    generate,
    simulate,
)
from pipeline.errors import ConfigError

RATE = 4000


def sim(label, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return simulate(label, rng=rng, sample_rate=RATE, n_samples=4 * RATE, snr_db=(30, 30), **kw)


def test_bearing_frequencies_match_the_cwru_6205_ratios():
    f = bearing_frequencies(1.0, **BEARING_6205)
    assert f["bpfo"] == pytest.approx(3.585, abs=0.005)
    assert f["bpfi"] == pytest.approx(5.415, abs=0.005)
    assert f["bsf"] == pytest.approx(2.357, abs=0.005)
    assert f["ftf"] == pytest.approx(0.398, abs=0.005)


def test_simulation_is_seeded():
    for label in CLASSES:
        a, b, c = sim(label, 1), sim(label, 1), sim(label, 2)
        assert a.dtype == np.float32 and a.shape == (4 * RATE,)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def dominant(x, lo, hi):
    freqs, psd = scipy.signal.welch(x, RATE, nperseg=4 * RATE)
    band = (freqs >= lo) & (freqs <= hi)
    return freqs[band][np.argmax(psd[band])]


def test_shaft_faults_put_energy_at_their_orders():
    assert dominant(sim("imbalance", shaft_hz=30.0), 5, 400) == pytest.approx(30.0, abs=1.5)
    assert dominant(sim("misalignment", shaft_hz=30.0), 5, 400) == pytest.approx(60.0, abs=1.5)
    freqs, psd = scipy.signal.welch(sim("looseness", shaft_hz=30.0), RATE, nperseg=4 * RATE)
    half = psd[np.argmin(abs(freqs - 45))] / np.median(psd[(freqs > 5) & (freqs < 400)])
    assert half > 10  # a half-harmonic (1.5x) stands well above the floor


@pytest.mark.parametrize(
    "label,key,factor", [("outer_race", "bpfo", 1), ("inner_race", "bpfi", 1), ("ball", "bsf", 2)]
)
def test_bearing_faults_repeat_at_their_fault_frequency(label, key, factor):
    x = sim(label, shaft_hz=30.0)
    # Envelope analysis: band-pass around the resonance, then the spectrum of the envelope.
    sos = scipy.signal.butter(4, [800, 1900], btype="bandpass", fs=RATE, output="sos")
    envelope = np.abs(scipy.signal.hilbert(scipy.signal.sosfiltfilt(sos, x)))
    expected = factor * bearing_frequencies(30.0, **BEARING_6205)[key]
    assert dominant(envelope - envelope.mean(), 50, 400) == pytest.approx(expected, rel=0.03)


def test_generate_writes_real_wav_files_and_a_marker(tmp_path):
    root = generate(tmp_path / "syn", n_per_class=3, sample_rate=RATE, duration_seconds=0.5, seed=7)
    files = sorted(root.rglob("*.wav"))
    assert len(files) == 3 * len(CLASSES)
    assert {f.parent.name for f in files} == set(CLASSES)
    data, rate = sf.read(files[0], dtype="float32")
    assert rate == RATE and data.shape == (2000,)
    marker = json.loads((root / MARKER).read_text())
    assert marker["n_files"] == 21 and marker["seed"] == 7
    # A file depends on (seed, class, index), not on how many files are generated.
    more = generate(
        tmp_path / "more", n_per_class=5, sample_rate=RATE, duration_seconds=0.5, seed=7
    )
    same = sf.read(more / "ball" / "ball_0002.wav")[0]
    np.testing.assert_array_equal(same, sf.read(root / "ball" / "ball_0002.wav")[0])


def test_ensure_dataset_reuses_regenerates_and_refuses_foreign_folders(tmp_path):
    root = tmp_path / "syn"
    params = dict(n_per_class=2, sample_rate=RATE, duration_seconds=0.25, snr_db=(0.0, 5.0), seed=0)
    ensure_dataset(root, **params)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.wav")}
    ensure_dataset(root, **params)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.wav")} == before
    (root / "healthy" / "mine.txt").write_text("a file the generator did not write")
    ensure_dataset(root, **{**params, "n_per_class": 1})
    assert len(list(root.rglob("*.wav"))) == len(CLASSES)
    assert (root / "healthy" / "mine.txt").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.wav").write_bytes(b"")
    with pytest.raises(ConfigError, match="holds files that the generator did not write"):
        ensure_dataset(foreign, **params)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"n_per_class": 0}, "data.generate.n_per_class=0 must be a positive number"),
        ({"n_per_class": 2.5}, "must be a positive integer"),
        ({"snr_db": (10.0, 0.0)}, r"data.generate.snr_db=\[10.0, 0.0\] must be \[low, high\]"),
        ({"duration_seconds": -1}, "duration_seconds=-1 must be a positive number"),
    ],
)
def test_bad_parameters_name_the_key(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        generate(tmp_path, **kw)
