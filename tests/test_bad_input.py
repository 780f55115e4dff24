"""Bad input as a hostile new user gives it: never a silent wrong result, never a traceback.

Each test reproduces one defect of issue 24 on real files in a temporary folder and
checks the new behaviour: the file skipped with its reason, or one line on stderr and
exit status 2, and nothing non-finite or partial written.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.errors import ConfigError, TrainingError
from pipeline.fit import TrainSettings, check_fingerprint, fit
from pipeline.models.resnet import build_resnet
from pipeline.overrides import suggest
from tests.conftest import write_tone_dataset

REPO = Path(__file__).resolve().parents[1]
RATE = 1000


def cli(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run", *overrides, "progress=false"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, no traceback, and every needle in the error line (Hydra logs to
    stdout; errors before Hydra starts go to stderr)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, out


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        "data=folder",
        f"data.root={data}",
        "train.epochs=2",
        "train.min_steps=0",
        "svm.C=[1.0]",
        "svm.gamma=[scale]",
        "svm.cv=2",
        f"features.cache_dir={run.parent / 'cache'}",
        f"hydra.run.dir={run}",
        *extra,
    ]


def write_huge(folder: Path) -> list[Path]:
    """A sine of amplitude 1e30 and random bytes read as float32: finite, but not for an STFT."""
    t = np.arange(RATE // 2) / RATE
    huge = folder / "low" / "huge.wav"
    sf.write(huge, (np.sin(2 * np.pi * 300 * t) * 1e30).astype("f4"), RATE, subtype="FLOAT")
    noise = np.random.default_rng(1).integers(0, 256, 4 * (RATE // 2), dtype=np.uint8)
    samples = noise.view("f4")
    samples = np.where(np.isfinite(samples), samples, 0).astype("f4")  # finite, some near 3e38
    garbage = folder / "mid" / "garbage.npy"
    np.save(garbage, samples)
    return [huge, garbage]


@pytest.fixture(scope="module")
def huge_run(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    tmp = tmp_path_factory.mktemp("huge")
    data = write_tone_dataset(tmp / "tones", rate=RATE)
    bad = write_huge(data)
    proc = cli(*train_args(data, tmp / "run", "models=[resnet,svm]", f"data.sample_rate={RATE}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp, data, bad


@pytest.mark.slow
def test_huge_finite_samples_are_skipped_and_nothing_non_finite_is_written(huge_run):
    tmp, _, bad = huge_run
    run = tmp / "run"
    with open(run / "skipped.csv") as f:
        skipped = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    for path in bad:
        assert "not finite" in skipped[str(path)] and "rescale" in skipped[str(path)]
    metrics = json.loads((run / "metrics.json").read_text())
    for m in metrics["models"].values():
        assert math.isfinite(m["accuracy"]) and math.isfinite(m["macro_f1"])
    for h in metrics["models"]["resnet"].get("history", []):
        assert math.isfinite(h["train_loss"])
    (entry,) = [p for p in (tmp / "cache").iterdir() if not p.name.startswith(".")]
    assert np.isfinite(np.load(entry / "images.npy")).all()
    normalizer = json.loads((run / "models" / "resnet" / "bundle.json").read_text())["normalizer"]
    assert all(math.isfinite(v) for v in np.ravel(normalizer["mean"] + normalizer["std"]))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet", "svm"])
def test_predict_lists_files_with_non_finite_images_as_errors(huge_run, model):
    tmp, data, bad = huge_run
    out = tmp / f"predict-{model}" / "predictions.csv"
    proc = cli(
        "task=predict",
        f"predict.model={tmp / 'run' / 'models' / model}",
        f"predict.input={data}",
        f"predict.output={out}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out.with_name("predictions_errors.csv")) as f:
        errors = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert set(errors) == {str(p) for p in bad}
    assert all("not finite" in reason for reason in errors.values())
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and all(math.isfinite(float(r["confidence"])) for r in rows)


def test_a_training_loss_that_becomes_nan_stops_the_run_naming_the_epoch():
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 2, (32,))
    settings = TrainSettings(epochs=3, batch_size=8, lr=1e30, precise_bn=False, amp=False)
    with pytest.raises(TrainingError, match=r"net: the training loss became nan in epoch 1 of 3"):
        fit(
            build_resnet(num_classes=2, depth=8),
            x,
            y,
            x[:0],
            y[:0],
            settings=settings,
            device=torch.device("cpu"),
            seed=0,
            progress=False,
            name="net",
        )


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_other_settings_data_or_a_damaged_one(huge_run, tmp_path):
    tmp, data, _ = huge_run
    folder = tmp_path / "resumed"
    shutil.copytree(tmp / "run" / "checkpoints", folder / "checkpoints")
    args = train_args(
        data, folder, "models=[resnet]", f"data.sample_rate={RATE}", "train.resume=true"
    )
    proc = cli(*args, "train.lr=0.01")
    assert_one_line_exit_2(proc, "was trained with train.lr=0.1", "this run has train.lr=0.01")
    other = write_tone_dataset(tmp_path / "other", rate=RATE, n_per_class=4)
    proc = cli(*args, f"data.root={other}")
    assert_one_line_exit_2(proc, f"data.root={json.dumps(str(data))}")
    checkpoint = folder / "checkpoints" / "resnet.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    proc = cli(*args)
    assert_one_line_exit_2(proc, f"{checkpoint} cannot be read as a checkpoint")
    assert "weights_only" not in proc.stderr


def test_a_checkpoint_without_a_fingerprint_is_not_resumed(tmp_path):
    with pytest.raises(ConfigError, match=r"x\.pt carries no record of the data and settings"):
        check_fingerprint(tmp_path / "x.pt", None, {"train.lr": "0.1"})
    check_fingerprint(tmp_path / "x.pt", {"train.lr": "0.1"}, {"train.lr": "0.1"})
    with pytest.raises(ConfigError, match=r"trained with classes=\[\"a\"\], and this run has "):
        check_fingerprint(tmp_path / "x.pt", {"classes": '["a"]'}, {"classes": '["a", "b"]'})


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("+data.segment.length=1.0", "did you mean data.segment.length_seconds?"),
        ("+data.test_size=0.3", "did you mean data.test_fraction?"),
        ("+features.hop=64", "did you mean features.hop_length?"),
        ("resnet.dept=56", "did you mean resnet.depth?"),
        ("train.learning_rate=0.1", "did you mean train.lr?"),
        ("+train.lr=0.1", "train.lr is a setting already; set it without the +"),
    ],
)
def test_unknown_keys_are_refused_with_the_closest_known_key(override, meant):
    proc = cli(override)
    assert_one_line_exit_2(proc, meant)
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout


def test_group_choices_and_hydra_keys_pass_the_key_check():
    """Keys a group choice brings (task=predict's predict.*) and Hydra's own are known."""
    proc = cli(
        "task=predict",
        "predict.model=/nonexistent",
        "predict.input=/nonexistent",
        "hydra.job.chdir=false",
        "hydra.run.dir=/tmp/never-written",
    )
    assert_one_line_exit_2(proc, "predict.input='/nonexistent' does not exist")


def test_suggest_prefers_siblings_and_other_tools_names():
    known = {
        "data",
        "data.segment",
        "data.segment.length_seconds",
        "data.segment.pad",
        "data.test_fraction",
        "data.test_regex",
        "features.hop_length",
        "features.top_db",
    }
    assert suggest("data.segment.length", known) == ["data.segment.length_seconds"]
    assert suggest("data.test_size", known) == ["data.test_fraction"]
    assert suggest("features.hop", known) == ["features.hop_length"]
    assert suggest("zzz", known) == []


@pytest.mark.slow
def test_one_file_far_longer_than_the_rest_is_refused_in_whole_file_mode(tmp_path):
    data = write_tone_dataset(tmp_path / "tones", rate=RATE)
    long = data / "high" / "ten_minutes.wav"
    sf.write(long, np.random.default_rng(0).standard_normal(600 * RATE).astype("f4") * 0.1, RATE)
    proc = cli(*train_args(data, tmp_path / "run", "models=[svm]"))
    assert_one_line_exit_2(
        proc,
        f"{long} is 600 s long",
        "times the median file (0.5 s)",
        "data.segment.length_seconds=0.5",
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            [
                "features.n_fft=100000",
                f"data.sample_rate={RATE}",
                "data.segment.length_seconds=0.5",
            ],
            "features.n_fft=100000 is longer than the 500-sample windows",
        ),
        (["features.n_fft=100000"], "features.n_fft=100000 is longer than the 500-sample windows"),
        (["data.sample_rate=abc"], "data.sample_rate='abc' must be a positive whole number"),
        (
            ["data.segment.length_seconds=abc"],
            "data.segment.length_seconds='abc' must be a positive",
        ),
        (["data.segment.hop_seconds=-1"], "data.segment.hop_seconds=-1 must be a positive"),
    ],
)
def test_sizes_and_numbers_that_cannot_work_are_refused_in_one_line(tmp_path, overrides, needle):
    data = write_tone_dataset(tmp_path / "tones", rate=RATE, n_per_class=2)
    proc = cli(*train_args(data, tmp_path / "run", "models=[svm]", *overrides))
    assert_one_line_exit_2(proc, needle)


@pytest.mark.slow
def test_a_folder_as_predict_output_is_refused_before_classifying(huge_run, tmp_path):
    tmp, data, _ = huge_run
    folder = tmp_path / "out"
    folder.mkdir()
    proc = cli(
        "task=predict",
        f"predict.model={tmp / 'run' / 'models' / 'svm'}",
        f"predict.input={data}",
        f"predict.output={folder}",
        "predict.overwrite=true",
    )
    assert_one_line_exit_2(proc, f"{folder} is a folder")
    assert list(folder.iterdir()) == [] and "classified" not in proc.stdout


@pytest.mark.slow
def test_ctrl_c_during_training_says_how_to_resume_and_exits_130(tmp_path):
    data = write_tone_dataset(tmp_path / "tones", rate=RATE)
    run = tmp_path / "run"
    args = train_args(data, run, "models=[resnet]", "train.epochs=500", "progress=false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "resnet.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    out = stdout + stderr
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    assert "resnet: stopped by Ctrl-C in epoch" in out
    assert f"train.resume=true hydra.run.dir={run}" in out


@pytest.mark.slow
def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path, full_disk):
    data = write_tone_dataset(tmp_path / "tones", rate=RATE)
    run = full_disk / "run"
    proc = cli(*train_args(data, run, "models=[resnet]"), f"features.cache_dir={tmp_path / 'c'}")
    checkpoint = run / "checkpoints" / "resnet.pt"
    assert_one_line_exit_2(proc, f"{checkpoint}: cannot be written: the device is full")
    assert not any(p.name.endswith(".tmp") for p in run.rglob("*"))


# --- a second, hostile read of the above (issue 24's review) ------------------------------


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    return write_tone_dataset(tmp_path_factory.mktemp("tones") / "data", rate=RATE, n_per_class=4)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.channels=5"], "data.channels=5 must be mix (their mean), all, or a non-empty"),
        (["data.channels=[1.5]"], "data.channels=[1.5] must be mix"),
        (["data.channels=[]"], "data.channels=[] must be mix"),
        (["data.channels=[-1]"], "negative indices would pick different channels"),
        (["features.size=5"], "features.size=5 must be [height, width]"),
        (["train.milestones=0.5"], "train.milestones=0.5 must be a list of fractions"),
        (["seed=abc"], "seed='abc' must be a whole number 0 or above"),
        (["seed=-1"], "seed=-1 must be a whole number 0 or above"),
        (["data.segment.pad=maybe"], "data.segment.pad='maybe' must be true or false"),
        (["features.center=maybe"], "features.center='maybe' must be true or false"),
        (["features.batch_size=0"], "features.batch_size=0 must be a positive number"),
        (["features.hop_length=5000", "features.n_fft=256"], "features.hop_length=5000 is longer"),
        (
            ["data.split=group", "data.group_regex='_(\\d)'", "data.test_groups=5"],
            "data.test_groups=5 must be a list of group names, e.g. [5]",
        ),
        (["svm.pca=10000"], "svm: fitting on"),
        (["svm.cv=0"], "svm: cv=0 must be an integer >= 2"),
        (["data.label_regex=zzz(\\d)"], "Hydra cannot parse it"),
        (["data=nowhere"], "Could not find 'data/nowhere'; the choices are folder, synthetic"),
        (["data.root=/tmp/a,b"], "a comma (or a range) makes it a sweep"),
    ],
)
def test_settings_a_hostile_user_tried_end_in_one_line(tones, tmp_path, overrides, needle):
    args = train_args(tones, tmp_path / "run", "models=[svm]", f"data.sample_rate={RATE}")
    if any(o.startswith("data=") for o in overrides):
        args = [a for a in args if a != "data=folder"]
    assert_one_line_exit_2(cli(*args, *overrides), needle)


@pytest.mark.slow
def test_settings_that_look_wrong_but_are_meant_work(tones, tmp_path):
    """A bare model name, numeric group names, a frequency crop with the default size."""
    names = tmp_path / "named"
    for path in tones.rglob("*.wav"):  # low_00.wav -> low/low_00_g0.wav, groups 0 and 1
        i = int(path.stem.split("_")[1])
        (names / path.parent.name).mkdir(parents=True, exist_ok=True)
        (names / path.parent.name / f"{path.stem}_g{i % 2}.wav").write_bytes(path.read_bytes())
    proc = cli(
        *train_args(names, tmp_path / "run", f"data.sample_rate={RATE}"),
        "models=svm",
        "data.split=group",
        "data.group_regex='_g(\\d)'",
        "data.test_groups=[1]",
        "features.f_max=400",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["models"]) == ["svm"] and metrics["features"]["f_max"] == 400


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_is_read_and_written_escaped(tones, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tones, data)
    t = np.arange(RATE // 2) / RATE
    name = os.fsencode(data / "low") + b"/odd\xffname.wav"
    sf.write(name, (0.3 * np.sin(2 * np.pi * 60 * t)).astype("f4"), RATE)
    run = tmp_path / "run"
    proc = cli(*train_args(data, run, "models=[svm]"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "p" / "predictions.csv"
    proc = cli(
        "task=predict",
        f"predict.model={run / 'models' / 'svm'}",
        f"predict.input={data}",
        f"predict.output={out}",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "odd\\udcffname.wav" in out.read_text(encoding="utf-8")  # valid UTF-8, escaped


def test_a_manifest_row_naming_a_missing_file_is_one_line(tones, tmp_path):
    manifest = tmp_path / "list.csv"
    rows = [f"{p},{p.parent.name}" for p in sorted(tones.rglob("*.wav"))]
    manifest.write_text("path,label\n" + "\n".join([*rows, f"{tones}/low/nope.wav,low"]) + "\n")
    proc = cli(*train_args(tones, tmp_path / "run", "models=[svm]"), f"data.manifest={manifest}")
    assert_one_line_exit_2(proc, f"{manifest}, line {len(rows) + 2}: {tones}/low/nope.wav does not")


def test_no_readable_file_names_the_first_reason_not_a_size(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "bad" / c).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "bad" / c / f"{i}.wav").write_text("junk")
    proc = cli(
        *train_args(tmp_path / "bad", tmp_path / "run", "models=[svm]", f"data.sample_rate={RATE}")
    )
    assert_one_line_exit_2(proc, "none of the 4 files can be read; the first:", "0.wav")


def test_a_file_rewritten_with_its_old_modification_time_changes_the_cache_key(tmp_path):
    from pipeline.features.cache import cache_key

    path = tmp_path / "x.wav"
    path.write_bytes(b"a" * 100)
    before = cache_key(files=[path], settings={})
    stat = path.stat()
    time.sleep(0.01)
    path.write_bytes(b"b" * 100)  # same size, then the old modification time back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache_key(files=[path], settings={}) != before


def test_complex_arrays_are_skipped_not_silently_made_real(tmp_path):
    from pipeline.errors import SignalError
    from pipeline.signals import read_signal

    path = tmp_path / "c.npy"
    np.save(path, np.exp(1j * np.arange(100)))
    with pytest.raises(SignalError, match="is complex; save its real part or its magnitude"):
        read_signal(path, sample_rate=RATE)


def test_export_names_its_own_key(tmp_path):
    proc = cli("task=export", f"export.model={tmp_path}")
    assert_one_line_exit_2(proc, "no bundle.json; point export.model at a folder")
