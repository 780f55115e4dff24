"""python -m pipeline.bench scale: its datasets, its reading of run folders and its verdicts,
on tiny inputs; no job is started (the benchmark itself is run by hand)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.bench import scale
from pipeline.bench.__main__ import main as bench


def test_dataset_holds_the_windows_asked_for_as_one_tone_per_class(tmp_path):
    root = tmp_path / "data"
    marker = scale.write_dataset(root, windows=87, file_seconds=5)
    files = sorted(root.glob("*/*.wav"))
    assert marker["files"] == len(files) == 18 and not marker["reused"]
    assert sorted({f.parent.name for f in files}) == sorted(scale.CLASSES)
    infos = [sf.info(f) for f in files]
    assert {(i.samplerate, i.channels, i.subtype) for i in infos} == {(4000, 1, "PCM_16")}
    assert sum(i.frames for i in infos) == 87 * 4000  # the last file holds the 2 s left
    for name, pitch in scale.CLASSES.items():
        x, rate = sf.read(next((root / name).glob("*.wav")))
        peak = np.argmax(np.abs(np.fft.rfft(x))) * rate / len(x)
        assert peak == pytest.approx(pitch, rel=0.04)  # each file within 3% of its class


def test_dataset_is_reused_only_with_the_same_parameters(tmp_path):
    root = tmp_path / "data"
    scale.write_dataset(root, windows=80, file_seconds=5)
    stamp = {f: f.stat().st_mtime_ns for f in root.glob("*/*.wav")}
    assert scale.write_dataset(root, windows=80, file_seconds=5)["reused"]
    assert {f: f.stat().st_mtime_ns for f in root.glob("*/*.wav")} == stamp
    again = scale.write_dataset(root, windows=80, file_seconds=4)
    assert not again["reused"] and len(list(root.glob("*/*.wav"))) == again["files"] == 20
    assert json.loads((root / scale.MARKER).read_text())["file_seconds"] == 4


def test_dataset_refuses_too_few_files_for_a_split_by_file(tmp_path):
    with pytest.raises(ValueError, match=r"gives 8 files, fewer than 4 for each of the 4"):
        scale.write_dataset(tmp_path, windows=80, file_seconds=10)


def _run_folder(tmp_path: Path, *, features: dict | None = None, seconds=2.0) -> tuple[Path, Path]:
    """A finished run's folder and its cache folder, as the job leaves them."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    entry = cache / "abc123"
    entry.mkdir(parents=True)
    np.save(entry / "images.npy", np.zeros((10, 1, 4, 4), np.float16))
    (entry / "meta.json").write_text("{}")
    dataset = {"n_train": 70, "n_val": 15, "n_test": 15, "n_files": 8}
    if features is not None:
        dataset["features"] = features
    history = [{"images_per_second": v} for v in (100.0, 300.0, 500.0)]
    metrics = {
        "dataset": dataset,
        "features": {
            "seconds": seconds,
            "cache_key": "abc123",
            "cache_hit": False,
            "image_shape": [1, 64, 32],
        },
        "histories": {"resnet": history},
    }
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "run.log").write_text("[x][INFO] - images (1, 64, 32) computed in 4.00 s\n")
    return run, cache


def test_a_run_is_measured_from_its_folder_before_the_job_reports_its_features(tmp_path):
    run, cache = _run_folder(tmp_path)
    got = scale.read_run(run, cache=cache)
    entry = cache / "abc123"
    assert got["windows"] == 100 and got["files"] == 8 and not got["hit"]
    assert got["files_per_second"] == 4.0  # 8 files in features.seconds=2
    assert got["cache_bytes"] == sum(f.stat().st_size for f in entry.iterdir())
    assert got["dtype"] == "float16" and got["in_memory"] is None
    assert got["images_per_second"] == 400.0  # epochs 2 and 3: the first warms up
    assert got["image_shape"] == [1, 64, 32]
    run, cache = _run_folder(tmp_path / "old", seconds=None)
    assert scale.read_run(run, cache=cache)["feature_seconds"] == 4.0  # from run.log


def test_the_jobs_own_feature_figures_are_taken_where_it_writes_them(tmp_path):
    written = {
        "seconds": 8.0,
        "files_per_second": 1.5,
        "cache_bytes": 123,
        "dtype": "float32",
        "in_memory": False,
    }
    run, cache = _run_folder(tmp_path, features=written)
    got = scale.read_run(run, cache=cache)
    assert (got["feature_seconds"], got["files_per_second"]) == (8.0, 1.5)
    assert (got["cache_bytes"], got["dtype"], got["in_memory"]) == (123, "float32", False)


def _row(label: str, mb: float, rate: float, **kw) -> dict:
    base = dict(label=label, way=label.split("-", 1)[1], mb=mb, anon_mb=mb / 2, seconds=10.0)
    base.update(windows=100, files=8, hit=False, files_per_second=4.0, cache_bytes=2**20)
    return {**base, "dtype": "float16", "in_memory": None, "images_per_second": rate, **kw}


def test_verdicts_check_both_targets_of_the_issue():
    rows = [
        _row("small-streamed", 1000, 95.0),
        _row("small-in-memory", 1500, 100.0),
        _row("large-streamed", 1400, 90.0),
    ]
    lines = scale.verdicts(rows, way="streamed", factor=10)
    assert "peak RSS at the small size: streamed 1000 MB, in memory 1500 MB" in lines
    assert "streamed / in memory: 0.95 (target >= 0.9): PASS" in lines[1]
    assert lines[2] == (
        "peak RSS, small -> large (10x the windows), streamed: 1000 -> 1400 MB, +400 MB; "
        "anonymous memory +200 MB (target < 500 MB): PASS"
    )
    rows[1]["images_per_second"], rows[2]["mb"] = 200.0, 1600
    lines = scale.verdicts(rows, way="streamed", factor=10)
    assert lines[1].endswith(": 0.47 (target >= 0.9): FAIL") and lines[2].endswith("FAIL")


def test_the_table_has_one_line_per_run_with_dashes_for_what_is_unknown(capsys):
    scale.print_rows([_row("small-current", 1234, 250.0, anon_mb=None, hit=True)])
    header, line = capsys.readouterr().out.splitlines()
    assert header.split()[:2] == ["run", "windows"] and "train img/s" in header
    assert re.fullmatch(
        r"small-current \(hit\)\s+100\s+8\s+1234\s+-\s+10\.0\s+1\.0\s+float16"
        r"\s+4\.0\s+250",
        line,
    )


def test_main_runs_the_small_job_both_ways_where_the_config_has_in_memory(
    tmp_path, monkeypatch, capsys
):
    """The plan and the report, with the runs replaced by fabricated figures."""
    ran = []

    def fake(root, *, out, label, way, hit, args, cgroup=None):
        ran.append((label, hit))
        size = 80 if label.startswith("small") else 160
        return _row(
            label,
            {"small": 900, "large": 1000}[label.split("-")[0]],
            100.0,
            windows=size,
            hit=hit,
            image_shape=[1, 64, 32],
        )

    monkeypatch.setattr(scale, "measure", fake)
    monkeypatch.setattr(scale, "has_in_memory", lambda path: True)
    argv = ["scale", "--windows", "80", "--file-seconds", "5", "--factor", "2", "--hit"]
    assert bench([*argv, "--out", str(tmp_path)]) == 0
    labels = ["small-streamed", "small-in-memory", "large-streamed"]
    assert ran == [(label, hit) for label in labels for hit in (False, True)]
    out = capsys.readouterr().out
    assert "small: 80 windows of 1 s, 16 files of 5 s at 4000 Hz" in out
    assert "images 1 x 64 x 32" in out
    assert "large-streamed: asked for 160 windows, the job cut 160" in out
    assert "streamed / in memory: 1.00 (target >= 0.9): PASS" in out
    assert "streamed (hit): 900 -> 1000 MB, +100 MB" in out


def test_help_and_bad_arguments(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        bench(["scale", "--help"])
    assert exit_.value.code == 0 and "--memory-limit SIZE" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        bench(["scale", "--memory-limit", "lots"])
    assert exit_.value.code == 2
    assert "--memory-limit='lots' must be a size such as 4G" in capsys.readouterr().err


def test_features_config_and_the_job_overrides(tmp_path):
    conf = tmp_path / "stft.yaml"
    conf.write_text("n_fft: auto\ncache: true\n")
    assert not scale.has_in_memory(conf)
    conf.write_text("n_fft: auto\nin_memory: false   # stream from the cache\n")
    assert scale.has_in_memory(conf)
    assert scale.features_group(["seed=1", "features=mel"]) == "mel"
    assert scale.features_group([]) == "stft"
    kw = dict(cache=tmp_path / "c", run_dir=tmp_path / "r", epochs=2, device="cpu")
    overrides = scale.job_overrides(tmp_path, in_memory=None, **kw)
    assert {"data=folder", "data.split=random", "models=[resnet]", "train.epochs=2"} <= set(
        overrides
    )
    assert not any("in_memory" in o for o in overrides)
    assert "features.in_memory=false" in scale.job_overrides(tmp_path, in_memory=False, **kw)


def test_no_cgroup_hierarchy_is_a_note_not_an_error(monkeypatch, capsys):
    monkeypatch.setattr(scale, "own_memory_cgroup", lambda: None)
    with scale.memory_cgroup("1G") as group:
        assert group is None
    assert "no run under --memory-limit" in capsys.readouterr().out


def test_a_failed_job_ends_the_benchmark_with_its_error_and_log(tmp_path, monkeypatch, capsys):
    def failed(overrides, *, cgroup=None):
        return {"mb": 1.0, "anon_mb": None, "seconds": 1.0, "exit": 2, "stderr": "boom"}

    monkeypatch.setattr(scale, "run_job", failed)
    monkeypatch.setattr(scale, "has_in_memory", lambda path: False)
    argv = ["scale", "--windows", "80", "--file-seconds", "5", "--out", str(tmp_path)]
    assert bench(argv) == 1
    captured = capsys.readouterr()
    assert "conf/features/stft.yaml has no in_memory key yet" in captured.out
    assert "small-current: the job exited with status 2: boom" in captured.err
    assert f"{tmp_path / 'runs' / 'small-current' / 'run.log'} was not written" in captured.err
