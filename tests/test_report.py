"""The report's figures, rendered from metrics-shaped data."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import report


def metrics_for(n_classes: int, **features) -> dict:
    return {
        "models": {},
        "dataset": {
            "classes": [f"class_{i}" for i in range(n_classes)],
            "sample_rate": 8000,
            "segment_samples": 8000,
        },
        "features": {
            "scale": "db",
            "n_fft": 256,
            "n_mels": None,
            "f_min": 0.0,
            "f_max": None,
            **features,
        },  # fmt: skip
    }


@pytest.mark.parametrize(
    "n_classes,features",
    [(1, {}), (7, {"n_mels": 40}), (40, {"f_min": 100.0, "f_max": 3000.0})],
)
def test_one_example_per_class_is_saved_as_png(tmp_path, n_classes, features):
    images = np.random.default_rng(0).normal(size=(n_classes, 1, 32, 20)).astype(np.float32)
    written = report.write_figures(tmp_path, metrics_for(n_classes, **features), examples=images)
    assert written == {"examples": "figures/examples.png"}
    png = (tmp_path / "figures" / "examples.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert not list((tmp_path / "figures").glob(".*.tmp"))  # written through a temporary file


def test_example_axes_are_in_seconds_and_hz_or_mel_bands():
    images = np.zeros((2, 1, 8, 8), np.float32)
    fig = report.plot_examples(images, metrics_for(2, f_min=500.0, f_max=2000.0))
    ax = fig.axes[0]
    assert ax.get_ylabel() == "frequency (Hz)" and ax.get_xlabel() == "time (s)"
    assert ax.images[0].get_extent() == [0.0, 1.0, 500.0, 2000.0]
    mel = report.plot_examples(images, metrics_for(2, n_mels=40)).axes[0]
    assert mel.get_ylabel().startswith("mel band (0-4000 Hz)")
    assert mel.images[0].get_extent() == [0.0, 1.0, 0.0, 40.0]
