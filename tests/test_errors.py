"""Errors name what the caller typed: a function's parameter below the task layer, the
config key from the command line (``pipeline.errors.config_keys``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.records import Record
from pipeline.data.split import split_records
from pipeline.errors import BundleError, ConfigError, DataError, config_keys
from pipeline.features.stft import STFTParams

REPO = Path(__file__).resolve().parents[1]
STFT = dict(
    hop_length=64,
    win_length=256,
    window="hann",
    center=True,
    pad_mode="reflect",
    power=2,
    scale="db",
    top_db=80.0,
    size=None,
)


def test_a_notebook_reads_the_parameter_it_passed():
    with pytest.raises(ConfigError) as err:
        STFTParams(n_fft=0, **STFT)
    assert str(err.value) == "n_fft=0 must be a positive integer"
    records = [Record(path=Path(f"{c}{i}.wav"), label=c) for c in "ab" for i in range(5)]
    with pytest.raises(ConfigError) as err:
        split_records(records, strategy="bogus", val_fraction=0.1, test_fraction=0.2, seed=0)
    assert str(err.value).startswith("split='bogus' must be one of ['auto', 'random'")
    with pytest.raises(ConfigError, match=r"^val_fraction=1.5 must be in \[0, 1\)"):
        split_records(records, strategy="random", val_fraction=1.5, test_fraction=0.2, seed=0)


def test_the_command_line_reads_the_config_key():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.run", "features.n_fft=0", "progress=false"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert "features.n_fft=0 must be a positive integer" in out, out


def test_config_keys_renames_the_first_mention_and_every_assignment():
    message = "n_mels=80 is too many for n_fft=256; lower n_mels or raise n_fft (n_mels=80)"
    with pytest.raises(ConfigError) as err, config_keys("features."):
        raise ConfigError(message, keys=("n_mels",))
    assert str(err.value) == (
        "features.n_mels=80 is too many for n_fft=256; lower n_mels or raise n_fft "
        "(features.n_mels=80)"
    )
    assert type(err.value) is ConfigError and err.value.keys == ()
    # A key of another group, and a class kept: a DataError stays one.
    with pytest.raises(DataError) as err, config_keys("features.", names={"rate": "data.rate"}):
        raise DataError("rate=0 and hop=3: lower hop", keys=("rate", "hop"))
    assert str(err.value) == "data.rate=0 and features.hop=3: lower hop"


def test_config_keys_leaves_errors_without_keys_and_renames_once():
    with pytest.raises(BundleError, match="^n_fft=0 as written$"), config_keys("features."):
        raise BundleError("n_fft=0 as written")
    # An error renamed by an inner task wrapper is not renamed again by an outer one.
    outer, inner = config_keys("x."), config_keys("train.")
    with pytest.raises(ConfigError, match="^train.lr=0 must be"), outer, inner:
        raise ConfigError("lr=0 must be positive", keys=("lr",))
    # A key is a whole name: neither part of another name nor of a dotted one.
    with pytest.raises(ConfigError) as err, config_keys("data."):
        raise ConfigError("split=x: a train/val/test split; set other.split", keys=("split",))
    assert str(err.value) == "data.split=x: a train/val/test split; set other.split"
