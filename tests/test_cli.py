"""End-to-end runs of ``python -m pipeline.run`` on tiny data, as a user would start them."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = ("resnet", "plain_cnn", "svm")


def run_cli(*overrides: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny(tmp: Path, run: str, *extra: str) -> list[str]:
    """A tiny version of the default job: few files, one epoch, small grid."""
    return [
        f"data.root={tmp / 'synthetic'}",
        "data.generate.n_per_class=8",
        "train.epochs=2",
        "train.min_steps=0",
        "train.batch_size=16",
        "svm.C=[1.0,10.0]",
        "svm.gamma=[scale]",
        "svm.cv=2",
        "progress=false",
        f"hydra.run.dir={tmp / run}",
        *extra,
    ]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("e2e")
    proc = run_cli(*tiny(tmp, "run1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp, proc


@pytest.mark.slow
def test_default_job_writes_metrics_report_and_models(default_run):
    tmp, proc = default_run
    run_dir = tmp / "run1"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["models"]) == set(MODELS)
    for name in MODELS:
        m = metrics["models"][name]
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
        assert m["n_params"] > 0 and m["train_seconds"] > 0
        assert (run_dir / "models" / name / "bundle.json").is_file()
        with open(run_dir / "predictions" / f"{name}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == metrics["dataset"]["n_test"]
        correct = sum(r["true"] == r["predicted"] for r in rows) / len(rows)
        assert correct == pytest.approx(m["accuracy"])
    ds = metrics["dataset"]
    assert len(ds["classes"]) == 7
    assert ds["n_train"] + ds["n_val"] + ds["n_test"] == 7 * 8
    # the ResNet and its plain twin differ only by the shortcuts (option B adds projections)
    assert metrics["models"]["resnet"]["n_params"] > metrics["models"]["plain_cnn"]["n_params"]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "figures" / "learning_curves.png").is_file()
    # the printed table and the report path
    assert re.search(r"^resnet\s+\d\.\d{4}", proc.stdout, re.M)
    assert f"report: {run_dir / 'report.md'}" in proc.stdout


@pytest.mark.slow
def test_report_headline_numbers_equal_metrics(default_run):
    tmp, _ = default_run
    metrics = json.loads((tmp / "run1" / "metrics.json").read_text())
    report = (tmp / "run1" / "report.md").read_text()
    for name in MODELS:
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        m = metrics["models"][name]
        assert cells[1] == f"{m['accuracy']:.4f}"
        assert cells[2] == f"{m['balanced_accuracy']:.4f}"
        assert cells[3] == f"{m['macro_f1']:.4f}"
        assert cells[4] == f"{m['n_params']:,}"
    assert "![learning curves](figures/learning_curves.png)" in report
    for figure in re.findall(r"\]\((figures/[^)]+)\)", report):
        assert (tmp / "run1" / figure).is_file()


@pytest.mark.slow
def test_same_seed_gives_the_same_results(default_run):
    tmp, _ = default_run
    proc = run_cli(*tiny(tmp, "run2"))  # the dataset exists now: it is reused, not regenerated
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the images come from the feature cache the first run wrote (see tests/conftest.py)
    key = json.loads((tmp / "run1" / "metrics.json").read_text())["features"]["cache_key"]
    assert f"feature cache miss {key}" in (tmp / "run1" / "run.log").read_text()
    assert f"feature cache hit {key}" in (tmp / "run2" / "run.log").read_text()
    first = json.loads((tmp / "run1" / "metrics.json").read_text())["models"]
    second = json.loads((tmp / "run2" / "metrics.json").read_text())["models"]
    for name in MODELS:
        assert first[name]["accuracy"] == second[name]["accuracy"]
        assert first[name]["confusion"] == second[name]["confusion"]
    for name in MODELS:
        a = (tmp / "run1" / "predictions" / f"{name}.csv").read_text()
        b = (tmp / "run2" / "predictions" / f"{name}.csv").read_text()
        assert a == b


@pytest.mark.slow
def test_a_folder_of_user_files_with_a_broken_one(tmp_path, tone_dataset):
    (tone_dataset / "mid" / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    proc = run_cli(
        "data=folder",
        f"data.root={tone_dataset}",
        "data.sample_rate=1000",
        "models=[resnet,svm]",
        "train.epochs=1",
        "train.min_steps=0",
        "features.n_fft=64",
        "features.hop_length=16",
        "features.win_length=64",
        "features.size=[16,16]",
        "svm.C=[1.0]",
        "svm.gamma=[scale]",
        "svm.cv=2",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"resnet", "svm"}
    assert metrics["dataset"]["classes"] == ["high", "low", "mid"]
    assert [s["path"] for s in metrics["dataset"]["skipped"]] == [
        str(tone_dataset / "mid" / "broken.wav")
    ]
    assert "broken.wav" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow
def test_a_run_without_validation_writes_strict_json_and_reports_it(tmp_path, tone_dataset):
    proc = run_cli(
        "data=folder",
        f"data.root={tone_dataset}",
        "data.sample_rate=1000",
        "data.val_fraction=0",
        "models=[resnet]",
        "train.epochs=2",
        "train.min_steps=0",
        "features.n_fft=64",
        "features.hop_length=16",
        "features.win_length=64",
        "features.size=[16,16]",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def no_constants(name):
        raise AssertionError(f"metrics.json holds {name}, which is not JSON")

    text = (tmp_path / "run" / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=no_constants)
    assert metrics["dataset"]["n_val"] == 0
    history = metrics["histories"]["resnet"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["val_loss"] is None and h["val_error"] is None for h in history)
    assert metrics["models"]["resnet"]["best_epoch"] == 2  # the last epoch is kept
    report = (tmp_path / "run" / "report.md").read_text()
    assert "weights of the last epoch, 2 (no validation split)" in report
    assert "| resnet | 2 |" in report and "| - | - |" in report
    assert (tmp_path / "run" / "figures" / "learning_curves.png").stat().st_size > 0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.epochs=0"], "train.epochs=0 must be a positive integer"),
        (["models=[resnet,lstm]"], "'lstm' is not a configured model; choose from"),
        (["resnet.depth=21"], "depth=21 is not of the form 6n+2"),
        (["plain_cnn.drop_path=0.2"], "drop_path=0.2 needs residual=True"),
        (["evaluate.adapt_bn=speaker"], "evaluate.adapt_bn='speaker' must be auto"),
        (["evaluate.adapt_bn=group"], "evaluate.adapt_bn=group needs each file's group"),
        (["features.window=kaiser"], "features.window='kaiser' must be one of"),
        (["data=folder"], "data.root"),
        (["data.split=bogus"], "data.split='bogus' must be one of"),
        (["trian.epochs=3"], "trian.epochs is not a setting; did you mean train.epochs"),
        (["data=nowhere"], "Could not find 'data/nowhere'"),
    ],
)
def test_bad_overrides_end_with_one_clear_line(tmp_path, overrides, message):
    proc = run_cli(*overrides, "progress=false", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in out
    assert "Traceback" not in out


FSDD = REPO.parent / "shared" / "datasets" / "fsdd" / "recordings"


@pytest.mark.slow
@pytest.mark.skipif(not FSDD.is_dir(), reason=f"the Free Spoken Digit Dataset is not at {FSDD}")
def test_real_recordings_official_split_through_a_manifest(tmp_path):
    """FSDD's official split (index 0-4 is test) on a subset: 3 digits, 2 speakers, 12 takes."""
    rows = ["path,label"]
    for digit in "017":
        for speaker in ("jackson", "theo"):
            rows += [f"{FSDD / f'{digit}_{speaker}_{i}.wav'},{digit}" for i in range(12)]
    (tmp_path / "subset.csv").write_text("\n".join(rows) + "\n")
    proc = run_cli(
        "data=folder",
        f"data.root={FSDD}",
        f"data.manifest={tmp_path / 'subset.csv'}",
        "data.split=regex",
        "data.test_regex='_[0-4]\\.wav$'",
        "data.segment.length_seconds=1.0",
        "models=[resnet,svm]",
        "train.epochs=3",
        "train.min_steps=0",
        "train.batch_size=16",
        "svm.C=[1.0]",
        "svm.gamma=[scale]",
        "svm.cv=2",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ds = metrics["dataset"]
    assert ds["classes"] == ["0", "1", "7"] and ds["sample_rate"] == 8000
    assert ds["files"]["test"] == 3 * 2 * 5 and ds["layout"] == "manifest"
    with open(tmp_path / "run" / "predictions" / "resnet.csv") as f:
        tested = {Path(r["path"]).name for r in csv.DictReader(f)}
    assert all(re.search(r"_[0-4]\.wav$", name) for name in tested)


@pytest.mark.slow
def test_long_multichannel_mat_recordings_with_a_time_split(tmp_path):
    """One long two-channel .mat recording per class, as test rigs save them; split by time."""
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    t = np.arange(30_000) / 2000
    for label, f in (("inner", 130.0), ("outer", 310.0), ("ball", 520.0)):
        x = np.stack([np.sin(2 * np.pi * f * t), 0.5 * rng.standard_normal(t.size)], axis=1)
        (tmp_path / "rig" / label).mkdir(parents=True)
        scipy_io.savemat(tmp_path / "rig" / label / "run.mat", {"X1_DE_time": x, "X1RPM": 1797.0})
    proc = run_cli(
        "data=folder",
        f"data.root={tmp_path / 'rig'}",
        "data.sample_rate=2000",
        "data.mat_key=DE_time",
        "data.channels=all",
        "data.split=time",
        "data.segment.length_seconds=0.25",
        "data.segment.hop_seconds=0.125",
        "features.n_fft=64",
        "features.hop_length=16",
        "features.win_length=64",
        "features.size=[16,16]",
        "models=[plain_cnn,svm]",
        "train.epochs=1",
        "train.min_steps=0",
        "train.monitor=val_accuracy",  # keeps the small validation region apart
        "svm.C=[1.0]",
        "svm.gamma=[scale]",
        "svm.cv=2",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ds = metrics["dataset"]
    assert ds["split"] == "time" and metrics["features"]["image_shape"] == [2, 16, 16]
    for c in ("inner", "outer", "ball"):
        assert all(ds["per_class"][c][s]["files"] == 1 for s in ("train", "val", "test"))
    with open(tmp_path / "run" / "predictions" / "svm.csv") as f:
        starts = [float(r["segment_start_seconds"]) for r in csv.DictReader(f)]
    assert min(starts) >= 15.0 * (1 - 0.15)  # test windows lie in the last 15 % of each recording
    # McNemar counts the independent units: the three test recordings, not their windows.
    assert metrics["significance"][0]["unit"] == "files"
    assert metrics["significance"][0]["n"] == 3


def read_predictions(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fsdd_subset(folder: Path, *, digits: str, takes: int) -> Path:
    """Links to FSDD's first ``takes`` takes of ``digits`` by george, lucas and theo."""
    folder.mkdir()
    for digit in digits:
        for speaker in ("george", "lucas", "theo"):
            for i in range(takes):
                name = f"{digit}_{speaker}_{i}.wav"
                os.symlink(FSDD / name, folder / name)
    return folder


@pytest.mark.slow
@pytest.mark.skipif(not FSDD.is_dir(), reason=f"the Free Spoken Digit Dataset is not at {FSDD}")
def test_fsdd_preset_official_split_on_a_subset(tmp_path):
    """+experiment=fsdd as a user runs it, on 4 digits x 3 speakers x 10 takes."""
    subset = fsdd_subset(tmp_path / "recordings", digits="0147", takes=10)
    proc = run_cli(
        "+experiment=fsdd",
        f"data.root={subset}",
        "train.epochs=2",
        "train.min_steps=0",
        "train.batch_size=16",
        "svm.cv=2",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=900,  # about a minute alone; far longer beside a benchmark on 2 cores
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ds = metrics["dataset"]
    assert ds["classes"] == ["0", "1", "4", "7"] and ds["files"]["test"] == 4 * 3 * 5
    f = metrics["features"]
    assert f["n_mels"] == 64 and f["image_shape"] == [1, 64, 64] and f["sample_rate"] == 8000
    assert set(metrics["models"]) == {"resnet", "plain_cnn", "svm"}
    with open(tmp_path / "run" / "predictions" / "resnet.csv") as fh:
        tested = {Path(r["path"]).name for r in csv.DictReader(fh)}
    assert tested and all(re.search(r"_[0-4]\.wav$", name) for name in tested)
