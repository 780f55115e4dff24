"""Long recordings in task=predict: blocks read as the whole file is cut, the timeline's
segments, predictions.html in headless Chromium, and peak memory at two lengths."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.blocks import read_blocks, streamed, window_starts
from pipeline.bundle import load_bundle
from pipeline.errors import ConfigError
from pipeline.features.stft import STFTParams
from pipeline.frontend import Frontend, Segmenting
from pipeline.tasks.predict import predict_folder
from pipeline.timeline import (
    Timeline,
    TimelineSettings,
    segments,
    timeline_paths,
    timeline_settings,
)
from tests.conftest import cli, read_csv, write_tone_dataset
from tests.test_report import CHROMIUM, COUNT_IMAGES, Page, chromium

REPO = Path(__file__).resolve().parents[1]
RATE = 1000  # the tone dataset's
FREQ = {"low": 60.0, "mid": 180.0, "high": 350.0}
# A ten-minute recording: (class, start s, end s); the changes fall inside windows
# (0.5 s long) at 130.2 s and 420.3 s, on a window's edge at 290 s.
PLAN = [("low", 0, 130.2), ("high", 130.2, 290), ("mid", 290, 420.3), ("low", 420.3, 600)]


def front(rate=RATE, seg=None, channels="mix") -> Frontend:
    seg = seg or Segmenting(500, 500, True)
    params = STFTParams(n_fft=64, hop_length=16, win_length=64)
    return Frontend(sample_rate=rate, segmenting=seg, params=params, read={"channels": channels})


def write_plan(path: Path, plan=PLAN, *, rate: int = RATE, seed: int = 1) -> Path:
    """A recording of noisy tones (the tone dataset's classes) that changes class at known
    times, as a real float WAV."""
    rng = np.random.default_rng(seed)
    parts = []
    for label, a, b in plan:
        t = np.arange(round(a * rate), round(b * rate)) / rate
        parts.append(np.sin(2 * np.pi * FREQ[label] * t) + 0.5 * rng.standard_normal(t.size))
    sf.write(path, (0.3 * np.concatenate(parts)).astype(np.float32), rate, subtype="FLOAT")
    return path


# -- reading in blocks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source_rate", "file_channels", "channels", "seg"),
    [
        (1000, 1, "mix", Segmenting(500, 500, True)),  # the working rate, no overlap
        (8000, 2, "mix", Segmenting(500, 200, True)),  # resampled down, overlapping
        (44100, 2, "all", Segmenting(300, 300, True)),  # 441:10, two channels kept
        (800, 2, [1], Segmenting(256, 100, False)),  # resampled up, no padded tail
    ],
)
def test_blocks_are_the_whole_files_windows_bit_for_bit(
    tmp_path, source_rate, file_channels, channels, seg
):
    rng = np.random.default_rng(0)
    x = 0.3 * rng.standard_normal((source_rate * 37 + 123, file_channels)).astype(np.float32)
    path = tmp_path / "long.wav"
    sf.write(path, x, source_rate, subtype="FLOAT")
    fe = front(seg=seg, channels=channels)
    whole = fe.windows(path)
    parts = list(read_blocks(path, fe, channels=whole.x.shape[1], block=17))
    assert all(not isinstance(p, str) for p in parts)
    assert [p.first for p in parts] == list(range(0, len(whole.x), 17))
    assert [p.last for p in parts] == [False] * (len(parts) - 1) + [True]
    np.testing.assert_array_equal(np.concatenate([p.x for p in parts]), whole.x)
    np.testing.assert_array_equal(window_starts(whole.n_samples, seg), whole.start)
    assert streamed(path, fe, block=17) and not streamed(path, fe, block=len(whole.x))


def test_a_bad_block_ends_the_file_with_the_reason(tmp_path):
    x = 0.3 * np.random.default_rng(0).standard_normal(20_000).astype(np.float32)
    x[12_345] = np.nan
    sf.write(tmp_path / "nan.wav", x, RATE, subtype="FLOAT")
    sf.write(tmp_path / "silent.wav", np.zeros(20_000, np.float32), RATE, subtype="FLOAT")
    sf.write(tmp_path / "two.wav", np.stack([x, x], 1), RATE, subtype="FLOAT")
    fe = front()
    nan = list(read_blocks(tmp_path / "nan.wav", fe, channels=1, block=8))
    assert len(nan) == 4 and "1 NaN or infinite value(s)" in nan[-1]  # 3 blocks, then why
    silent = list(read_blocks(tmp_path / "silent.wav", fe, channels=1, block=8))
    assert "every sample is zero" in silent[-1] and len(silent) == 5
    fe2 = front(channels="all")
    (two,) = list(read_blocks(tmp_path / "two.wav", fe2, channels=1, block=8))
    assert "has 2 channel(s) where the windows have 1" in two


def test_reading_workers_pass_a_long_files_blocks_in_order(tmp_path):
    from pipeline.blocks import Part
    from pipeline.tasks.predict import WindowReader, read_files

    rng = np.random.default_rng(0)
    for i, seconds in enumerate([40, 3, 25, 0.2]):  # streamed, whole, streamed, too short
        x = 0.3 * rng.standard_normal(round(seconds * RATE)).astype(np.float32)
        sf.write(tmp_path / f"{i}.wav", x, RATE, subtype="FLOAT")
    reader = WindowReader(front(seg=Segmenting(500, 500, False)), channels=1, block=16)
    inline = list(read_files(tmp_path, reader, workers=0))
    parallel = list(read_files(tmp_path, reader, workers=2, chunk=2))
    assert [p for p, _ in parallel] == [p for p, _ in inline]
    kinds = {p.name: [] for p, _ in inline}
    for (_, a), (path, b) in zip(inline, parallel, strict=True):
        assert type(a) is type(b)
        if isinstance(a, Part):
            assert (a.first, a.last) == (b.first, b.last)
            np.testing.assert_array_equal(a.x, b.x)
        kinds[path.name].append(type(a).__name__)
    assert kinds == {
        "0.wav": ["Part"] * 5,  # 80 windows
        "1.wav": ["ndarray"],
        "2.wav": ["Part"] * 4,  # 50 windows
        "3.wav": ["str"],
    }


# -- segments ------------------------------------------------------------------------------


def test_segments_merge_runs_and_the_median_removes_a_single_flip():
    labels = np.array([0] * 5 + [1] + [0] * 4 + [2] * 6)
    probs = np.full((len(labels), 3), 0.1)
    probs[np.arange(len(labels)), labels] = 0.8
    starts = np.arange(len(labels)) * 0.5
    raw = segments(probs, starts, window_seconds=0.5, smooth=1)
    assert [(s.start, s.end, s.label, s.windows) for s in raw] == [
        (0.0, 2.5, 0, 5),
        (2.5, 3.0, 1, 1),
        (3.0, 5.0, 0, 4),
        (5.0, 8.0, 2, 6),
    ]
    assert all(s.confidence == pytest.approx(0.8) for s in raw)
    smooth = segments(probs, starts, window_seconds=0.5, smooth=3)
    assert [(s.start, s.end, s.label) for s in smooth] == [(0.0, 5.0, 0), (5.0, 8.0, 2)]
    # the windows' own probability of the class, the flipped window's 0.1 included
    assert smooth[0].confidence == pytest.approx((9 * 0.8 + 0.1) / 10)
    # overlapping windows (1 s every 0.25 s): a boundary halfway between the centres
    half = segments(probs[:8], np.arange(8) * 0.25, window_seconds=1.0, smooth=1)
    assert [(s.start, s.end) for s in half] == [(0.0, 1.625), (1.625, 1.875), (1.875, 2.75)]


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("timeline", "yes", r"predict.timeline='yes' must be auto .*, true .* or false"),
        ("timeline", 1, r"predict.timeline=1 must be auto"),
        ("min_windows", 0, r"predict.timeline_min_windows=0 must be a positive integer"),
        ("max_files", -1, r"predict.timeline_files=-1 must be a whole number"),
        ("smooth", 4, r"predict.timeline_smooth=4 must be an odd positive integer"),
        ("smooth", 2.0, r"predict.timeline_smooth=2.0 must be an odd"),
    ],
)
def test_timeline_settings_name_the_key_the_value_and_the_fix(key, value, match):
    good = {"timeline": "auto", "min_windows": 60, "max_files": 20, "smooth": 3}
    with pytest.raises(ConfigError, match=match):
        timeline_settings(**{**good, key: value})
    assert timeline_settings(**{**good, "timeline": False}) is None
    assert timeline_paths(Path("/x/p.html")) == [Path("/x/p_timeline.csv"), Path("/x/p.html.html")]


def test_predict_cli_refuses_a_bad_timeline_setting(tmp_path):
    proc = cli(
        "task=predict",
        f"predict.model={tmp_path}",
        f"predict.input={tmp_path}",
        "predict.timeline_smooth=2",
        f"hydra.run.dir={tmp_path / 'h'}",
    )
    assert proc.returncode == 2
    assert "predict.timeline_smooth=2 must be an odd positive integer" in proc.stdout + proc.stderr


# -- through predict -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A ResNet and an SVM trained on whole 0.5 s files of three noisy tones at 1 kHz."""
    tmp = tmp_path_factory.mktemp("trained")
    data = write_tone_dataset(tmp / "tones", n_per_class=10)
    proc = cli(
        "data=folder",
        f"data.root={data}",
        "models=[resnet,svm]",
        "train.epochs=2",
        "train.min_steps=0",
        "train.batch_size=8",
        "features.n_fft=64",
        "features.hop_length=16",
        "features.win_length=64",
        "features.size=[16,16]",
        "svm.C=[1.0]",
        "svm.gamma=[scale]",
        "svm.cv=2",
        "train.amp=false",
        f"hydra.run.dir={tmp / 'run'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "run" / "models"


def _predict(bundle, source: Path, out: Path, *, batch_size: int, timeline=None) -> dict:
    outputs = [out, out.with_name(out.stem + "_errors.csv"), out.with_name(out.stem + "_seg.csv")]
    return predict_folder(
        bundle,
        source,
        outputs=outputs,
        device=torch.device("cpu"),
        batch_size=batch_size,
        top_k=3,
        timeline=timeline,
    )


@pytest.mark.slow
def test_a_file_read_in_blocks_gets_the_rows_of_a_file_read_whole(trained, tmp_path):
    """Blocks of 16 windows (one file of 300 streamed) against one batch of the whole file,
    and a file whose last block holds a NaN refused as a whole-file read refuses it."""
    bundle = load_bundle(trained / "resnet")
    folder = tmp_path / "in"
    folder.mkdir()
    write_plan(folder / "a.wav", [("low", 0, 60), ("mid", 60, 150)])
    x = 0.3 * np.random.default_rng(2).standard_normal(150_000).astype(np.float32)
    x[-2000] = np.inf
    sf.write(folder / "b.wav", x, RATE, subtype="FLOAT")
    blocks = _predict(bundle, folder, tmp_path / "blocks.csv", batch_size=16)
    whole = _predict(bundle, folder, tmp_path / "whole.csv", batch_size=10_000)
    assert blocks["classified"] == whole["classified"] == 1
    assert blocks["errors"] == whole["errors"] == 1
    for name in ("", "_seg"):  # the same rows, to float rounding across batch sizes
        a, b = (read_csv(tmp_path / f"{w}{name}.csv") for w in ("blocks", "whole"))
        assert len(a) == len(b) and all(same_row(r, s) for r, s in zip(a, b, strict=True))
    assert len(read_csv(tmp_path / "blocks_seg.csv")) == 300
    errors = [read_csv(tmp_path / f"{w}_errors.csv") for w in ("blocks", "whole")]
    assert [[e["path"] for e in rows] for rows in errors] == [[str(folder / "b.wav")]] * 2
    assert all("1 NaN or infinite value(s)" in rows[0]["reason"] for rows in errors)


def test_predict_hop_seconds_sets_the_stride_and_keeps_the_window(trained, tmp_path):
    """A 3 s recording under a bundle of 0.5 s windows: 6 windows at its own hop, 26 at
    0.1 s, read whole or in blocks of 8; the window (and each image) stays 0.5 s."""
    bundle = load_bundle(trained / "resnet")
    folder = tmp_path / "in"
    folder.mkdir()
    write_plan(folder / "a.wav", [("low", 0, 3.0)])
    starts = {}
    for hop, batch in ((None, 256), (0.1, 256), (0.1, 8)):
        out = tmp_path / f"{hop}-{batch}.csv"
        outputs = [
            out,
            out.with_name(out.stem + "_errors.csv"),
            out.with_name(out.stem + "_seg.csv"),
        ]
        predict_folder(bundle, folder, outputs=outputs, batch_size=batch, top_k=1, hop_seconds=hop)
        rows = read_csv(outputs[2])
        starts[(hop, batch)] = [float(r["start_seconds"]) for r in rows]
    assert starts[(None, 256)] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert starts[(0.1, 256)] == pytest.approx([0.1 * i for i in range(26)])
    assert starts[(0.1, 8)] == starts[(0.1, 256)]


def test_predict_cli_refuses_a_bad_hop(tmp_path):
    proc = cli(
        "task=predict",
        f"predict.model={tmp_path}",
        f"predict.input={tmp_path}",
        "predict.hop_seconds=0",
        f"hydra.run.dir={tmp_path / 'h'}",
    )
    assert proc.returncode == 2
    assert "predict.hop_seconds=0 must be a positive number of seconds" in proc.stdout + proc.stderr


def same_row(a: dict, b: dict) -> bool:
    """Two rows of predict's CSVs alike: their text, their numbers within 1e-5."""
    for key in a.keys() | b.keys():
        try:
            if abs(float(a[key]) - float(b[key])) > 1e-5:
                return False
        except ValueError:
            if a[key] != b[key]:
                return False
    return True


@pytest.mark.slow
def test_the_timeline_of_a_ten_minute_recording_finds_its_changes(trained, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_plan(folder / "recording.wav")
    write_plan(folder / "clip.wav", [("high", 0, 2)])  # 4 windows: no timeline under auto
    out = tmp_path / "out" / "labels.csv"
    proc = cli(
        "task=predict",
        f"predict.model={trained / 'svm'}",
        f"predict.input={folder}",
        f"predict.output={out}",
        f"hydra.run.dir={tmp_path / 'h'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "timelines: " in proc.stdout and "(1 file(s))" in proc.stdout
    rows = read_csv(out.with_name("labels_timeline.csv"))
    assert {r["path"] for r in rows} == {str(folder / "recording.wav")}
    assert [r["predicted"] for r in rows] == [label for label, _, _ in PLAN]
    assert float(rows[0]["start_seconds"]) == 0 and float(rows[-1]["end_seconds"]) == 600
    for r, (_, a, b) in zip(rows, PLAN, strict=True):
        assert abs(float(r["start_seconds"]) - a) <= 0.5 and abs(float(r["end_seconds"]) - b) <= 0.5
        assert 0.5 < float(r["confidence"]) <= 1 and int(r["windows"]) > 200
    files = {Path(r["path"]).name: r for r in read_csv(out)}
    assert files["recording.wav"]["n_segments"] == "1200"
    assert files["clip.wav"]["predicted"] == "high"

    html = out.with_name("labels.html")
    page = Page(html.read_text())
    assert len(page.images) == 2  # the confidence histogram and the recording's timeline
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    table = page.tables["segments-1"]
    assert [r[2] for r in table[1:]] == [r["predicted"] for r in rows]
    assert page.tables["counts"][1:] == [["high", "1"], ["low", "1"], ["mid", "0"]]
    if CHROMIUM is None:
        pytest.skip("no chromium or chromium-browser on PATH (Debian: apt-get install -y chromium)")
    probe = tmp_path / "probe" / "labels.html"
    probe.parent.mkdir()
    probe.write_text(html.read_text().replace("</body>", COUNT_IMAGES + "</body>"))
    shown = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert "<title>decoded 2 of 2</title>" in shown.stdout, shown.stderr[-2000:]


@pytest.mark.slow
def test_timeline_true_draws_every_file_and_false_writes_neither(trained, tmp_path):
    bundle = load_bundle(trained / "svm")
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        write_plan(folder / f"c{i}.wav", [("mid", 0, 1.5)], seed=i)
    out = tmp_path / "p.csv"
    every = Timeline(
        TimelineSettings(mode=True, max_files=2, smooth=1),
        classes=bundle.classes,
        window_seconds=0.5,
        paths=timeline_paths(out),
        about={"model": "svm", "input": str(folder)},
    )
    _predict(bundle, folder, out, batch_size=256, timeline=every)
    assert every.timelines == 3 and len(every.figures) == 2
    assert len(read_csv(tmp_path / "p_timeline.csv")) == 3
    assert len(Page((tmp_path / "p.html").read_text()).images) == 3  # histogram, 2 figures
    none = tmp_path / "none"
    proc = cli(
        "task=predict",
        f"predict.model={trained / 'svm'}",
        f"predict.input={folder}",
        "predict.timeline=false",
        f"hydra.run.dir={none}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in none.glob("predictions*")) == [
        "predictions.csv",
        "predictions_errors.csv",
    ]


# -- memory --------------------------------------------------------------------------------


def peak_rss_mb(*overrides: str) -> float:
    """Peak resident memory of a ``python -m pipeline.run`` child process (Linux: kB)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", *overrides, "progress=false"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return usage.ru_maxrss / 1024


def write_long(path: Path, minutes: int) -> Path:
    """A 16-bit WAV of ``minutes`` of a noisy 180 Hz tone, written a minute at a time."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", RATE, 1, subtype="PCM_16") as f:
        for a in range(minutes):
            t = np.arange(a * 60 * RATE, (a + 1) * 60 * RATE) / RATE
            x = np.sin(2 * np.pi * 180 * t) + 0.5 * rng.standard_normal(t.size)
            f.write((0.3 * x).astype(np.float32))
    return path


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kilobytes on Linux only")
def test_peak_memory_of_a_recording_ten_times_longer(trained, tmp_path):
    """10 and 100 minutes (1,200 and 12,000 windows) through the ResNet, each in a child
    process. Read whole and classified in one batch (predict before pipeline.blocks), the
    100 minutes peaked 653 MB above the 10 (measured on the 2-core CPU); in blocks of
    predict.batch_size windows, +14 and -14 MB in two runs (the allocator's noise, see
    docs/predict-and-export.md)."""
    peaks = {}
    for minutes in (10, 100):
        path = write_long(tmp_path / f"rec{minutes}.wav", minutes)
        peaks[minutes] = peak_rss_mb(
            "task=predict",
            f"predict.model={trained / 'resnet'}",
            f"predict.input={path}",
            f"predict.output={tmp_path / f'p{minutes}.csv'}",
            f"hydra.run.dir={tmp_path / 'h' / str(minutes)}",
        )
    rows = read_csv(tmp_path / "p100.csv")
    assert rows[0]["n_segments"] == "12000"
    assert (tmp_path / "p100_timeline.csv").is_file()
    assert peaks[100] - peaks[10] < 40, peaks


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kilobytes on Linux only")
def test_the_longfile_benchmark_runs_end_to_end_on_tiny_recordings(capsys):
    from pipeline.bench.__main__ import main

    args = ["--minutes", "0.1", "--factor", "2", "--source-rate", "8000", "--batch-size", "2"]
    assert main(["longfile", *args]) == 0  # the files of 6 and 12 windows read 2 at a time
    out = capsys.readouterr().out
    assert "blocks: 2x longer: peak RSS grows by" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("blocks ")]
    assert [(r[1], r[2]) for r in rows] == [("0.1", "6"), ("0.2", "12")]
    assert all(float(r[3]) > 100 for r in rows)  # MB: a Python with torch, at least
