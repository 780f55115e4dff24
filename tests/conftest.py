"""Shared fixtures: tiny datasets written to temporary folders."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]

# One thread per process where pytest-xdist runs as many workers as there are cores: each
# worker's CLI child would otherwise start a thread per core, and torch's threads slow down
# many times over when another process holds a core. Children inherit the setting; a test
# that needs more threads sets its own.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= (os.cpu_count() or 1):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def cli(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m pipeline.run <overrides> progress=false`` in the repository, captured."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run", *overrides, "progress=false"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV the pipeline wrote, as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_tone_dataset(
    root: Path, *, n_per_class: int = 6, rate: int = 1000, seconds: float = 0.5
) -> Path:
    """Three classes of noisy tones (low, mid, high) as real WAV files under root/<class>/."""
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    for label, freq in (("low", 60.0), ("mid", 180.0), ("high", 350.0)):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            x = np.sin(2 * np.pi * (freq + rng.uniform(-10, 10)) * t) + 0.5 * rng.standard_normal(
                t.size
            )
            sf.write(
                folder / f"{label}_{i:02d}.wav", (0.3 * x).astype(np.float32), rate, subtype="FLOAT"
            )
    return root


@pytest.fixture(scope="session", autouse=True)
def feature_cache_in_tmp(tmp_path_factory):
    """Point the feature cache (and the CLI runs the tests start) at a temporary folder.

    ``conf/features/*.yaml`` read ``PIPELINE_FEATURE_CACHE`` before their default of
    ``.cache/features`` under the working folder, so no test writes into the checkout.
    """
    before = os.environ.get("PIPELINE_FEATURE_CACHE")
    os.environ["PIPELINE_FEATURE_CACHE"] = str(tmp_path_factory.mktemp("feature-cache"))
    yield Path(os.environ["PIPELINE_FEATURE_CACHE"])
    if before is None:
        del os.environ["PIPELINE_FEATURE_CACHE"]
    else:
        os.environ["PIPELINE_FEATURE_CACHE"] = before


@pytest.fixture
def tone_dataset(tmp_path: Path) -> Path:
    return write_tone_dataset(tmp_path / "tones")


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a fresh 256 KiB tmpfs, unmounted afterwards; skipped without permission."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount command here")
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def extracted(n=5, seed=0, shape=(1, 6, 4)):
    """Images and bookkeeping of five windows of three files, the third skipped."""
    from pipeline.data.dataset import Skipped
    from pipeline.features.extract import Extracted

    rng = np.random.default_rng(seed)
    return Extracted(
        images=rng.normal(size=(n, *shape)).astype(np.float32),
        record=np.arange(n) % 3,
        start=np.arange(n) * 100,
        split=np.array(["train", "val", "test", "train", "train"][:n]),
        file_samples=np.array([500, 500, -1]),
        file_rates=np.array([1000, 1000, -1]),
        skipped=[Skipped(Path("c.wav"), "c.wav: too short")],
    )


@pytest.fixture
def files(tmp_path) -> list[Path]:
    paths = []
    for name in ("a.npy", "b.npy", "c.npy"):
        np.save(tmp_path / name, np.zeros(500, np.float32))
        paths.append(tmp_path / name)
    return paths
