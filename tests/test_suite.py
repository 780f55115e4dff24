"""The development suite: its generated traces, its table and its targets."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from pipeline.bench.__main__ import main
from pipeline.bench.suite import targets, write_tiny_manifest
from pipeline.bench.traces import CLASS_HZ, SAMPLE_RATE, SAMPLES, write_traces


def test_traces_carry_their_class_in_the_frequency_of_a_burst(tmp_path):
    root = write_traces(tmp_path / "traces", n_per_class=12, seed=1)
    freqs = np.fft.rfftfreq(SAMPLES, 1 / SAMPLE_RATE)
    for label, hz in enumerate(CLASS_HZ):
        files = sorted((root / f"{hz:g}hz").glob("*.npy"))
        assert len(files) == 12
        x = np.stack([np.load(f) for f in files])  # (files, channels, samples)
        assert x.shape[1:] == (3, SAMPLES) and x.dtype == np.float32
        power = (np.abs(np.fft.rfft(x - x.mean(-1, keepdims=True), axis=-1)) ** 2).max(1)
        at = [power[:, np.argmin(abs(freqs - f))].mean() for f in CLASS_HZ]
        assert int(np.argmax(at)) == label


def test_tiny_manifest_keeps_five_training_takes_per_digit_and_the_official_test(tmp_path):
    fsdd = tmp_path / "fsdd"
    fsdd.mkdir()
    for digit in range(10):
        for take in range(9):
            sf.write(fsdd / f"{digit}_anna_{take}.wav", np.zeros(80, np.float32), 8000)
    rows = write_tiny_manifest(fsdd, tmp_path / "tiny.csv", per_class=2).read_text().splitlines()
    assert rows[0] == "path,label,split"
    splits = [r.rsplit(",", 1)[1] for r in rows[1:]]
    assert splits.count("train") == 20 and splits.count("test") == 50
    assert all(
        r.endswith("test") == (r.split(",")[0][-6:-4] in {f"_{t}" for t in range(5)})
        for r in rows[1:]
    )


def test_targets_are_stated_met_or_not_with_their_figures():
    rows = {
        "gunpoint": {"models": {"resnet": (0.97, 0.01), "svm": (0.95, 0.0)}},
        "traces": {"models": {"resnet": (0.80, 0.02), "svm": (0.85, 0.01)}},
    }
    lines = targets(rows)
    assert "ResNet 0.970, SVM 0.950: **met**" in lines[0]
    assert "**not met** on traces (0.800 against 0.850)" in lines[1]


@pytest.mark.slow
def test_suite_runs_the_cli_and_writes_its_table_above_what_the_file_held(tmp_path, capsys):
    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks: Free Spoken Digit Dataset\n\nkept as it is\n")
    argv = [
        "suite",
        "--only",
        "traces",
        "--seeds",
        "0",
        "--runs",
        str(tmp_path / "runs"),
        "--output",
        str(output),
        "train.epochs=1",
        "train.min_steps=2",
        "resnet.depth=8",
        "svm.C=[1.0]",
        "svm.gamma=[scale]",
        "svm.cv=2",
    ]
    assert main(argv) == 0
    text = output.read_text()
    assert text.index("<!-- suite -->") < text.index("# Benchmarks: Free Spoken Digit Dataset")
    assert "kept as it is" in text
    row = next(line for line in text.splitlines() if line.startswith("| traces"))
    assert row.count("|") == 15 and "| 340/0/60 |" in row  # the small validation trains
    assert "| 4 (85) |" in row  # 340 windows: batch 85, one epoch
    assert "python -m pipeline.run data=folder" in text and "data.channels=all" in text
    # A second run reads the finished run folder back instead of training again.
    assert main(argv) == 0
    assert output.read_text().count("<!-- suite -->") == 1


def test_suite_reuses_a_run_folder_only_with_the_same_config_and_precision(tmp_path):
    import json

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.bench.suite import REPO, _same_config
    from pipeline.runtime import precision, resolve_device

    overrides = ["+experiment=fsdd", "data.split=group", "data.test_groups=[theo]"]
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    here = precision(resolve_device(cfg.device), cfg.train.amp)
    for used, same in ((here, True), (None, False), ("float16", False)):
        run = {} if used is None else {"precision": used}
        (tmp_path / "metrics.json").write_text(json.dumps({"run": run}))
        assert _same_config(tmp_path, overrides) is same
    assert not _same_config(tmp_path, [*overrides, "train.epochs=3"])
