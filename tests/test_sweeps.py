"""The application's ``--help``, and Optuna searches (``-m hparams_search=...``) that tune on
the validation split and summarise the best trial, run as a user starts them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from tests.conftest import write_tone_dataset

REPO = Path(__file__).resolve().parents[1]
TASKS = ("compare", "predict", "export", "report")
GROUPS = ("data", "features", "model", "train", "task", "hparams_search")
# Windows of 0.1 s from 0.5 s files: 5 per file, so 3 classes of 10 files leave about 9
# validation and 4 test files; train.monitor=val_accuracy keeps so few validation windows apart.
TINY = [
    "data=folder",
    "data.sample_rate=1000",
    "data.segment.length_seconds=0.1",
    "data.segment.hop_seconds=0.1",
    "data.val_fraction=0.3",
    "data.test_fraction=0.2",
    "features.n_fft=64",
    "features.hop_length=16",
    "features.win_length=64",
    "features.size=[16,16]",
    "svm.cv=2",
    "train.epochs=1",
    "train.min_steps=0",
    "train.batch_size=8",
    "train.amp=false",
    "train.monitor=val_accuracy",
    "resnet.depth=8",
    "device=cpu",
    "progress=false",
]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class RecordReturn(Callback):
    """Test-only Hydra callback: each job's return value (what the sweeper is given) into
    ``returned.json`` in the job's run folder."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        folder = Path(config.hydra.runtime.output_dir)
        (folder / "returned.json").write_text(json.dumps(job_return.return_value))


RECORD = f"+hydra.callbacks.record._target_={__name__}.RecordReturn"


def test_help_lists_the_tasks_groups_overrides_and_docs():
    proc = cli("--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in TASKS:
        assert f"\n{name} " in out, name
    for group in GROUPS:
        assert f"\n{group}: " in out, group
    assert "hparams_search: resnet, svm" in out and "model: " in out and "resnet" in out
    for override in ("data=folder data.root=", "models=[", "task=predict predict.model=", "-m "):
        assert override in out, override
    assert "README.md" in out and "docs/" in out and "--hydra-help" in out
    assert "powered by Hydra" not in out  # not Hydra's generic help
    hydra_help = cli("--hydra-help")
    assert hydra_help.returncode == 0 and "--multirun" in hydra_help.stdout


def test_a_search_needs_multirun_and_a_validation_figure(tmp_path):
    proc = cli("hparams_search=svm")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "Error: hparams_search=svm is a search of many trials (one run each); add -m: "
        "python -m pipeline.run -m hparams_search=svm"
    )
    shown = cli("hparams_search=svm", "--cfg", "job")  # printed, not run: no -m needed
    assert shown.returncode == 0 and "optimized_metric: svm/val_accuracy" in shown.stdout
    sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    proc = cli("-m", "hparams_search=svm", "optimized_metric=svm/accuracy", *TINY, sweep)
    assert proc.returncode == 2
    log = proc.stdout + proc.stderr  # Hydra's log goes to stdout
    assert "optimized_metric=svm/accuracy must be <model>/val_accuracy" in log
    assert "never on the test split" in log


def test_without_the_tune_extra_a_search_fails_with_one_line(tmp_path):
    # An empty regular package shadows hydra_plugins, so the Optuna sweeper is not importable.
    (tmp_path / "hydra_plugins").mkdir()
    (tmp_path / "hydra_plugins" / "__init__.py").write_text("")
    args = ["-m", "hparams_search=resnet", *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    script = (
        f"import runpy, sys; sys.path.insert(0, {str(tmp_path)!r}); sys.argv = ['run', "
        f"*{args!r}]; runpy.run_module('pipeline.run', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "Error: hparams_search=resnet needs Hydra's Optuna sweeper, which is not installed; "
        'install the tune extra: pip install -e ".[tune]"'
    ]


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    return write_tone_dataset(tmp_path_factory.mktemp("tones"), n_per_class=10)


@pytest.mark.slow
def test_a_search_without_validation_windows_is_refused(tmp_path, tones):
    proc = cli(
        "-m",
        "hparams_search=svm",
        *TINY,
        "data.val_fraction=0",
        f"data.root={tones}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.returncode == 2
    assert (
        "optimized_metric=svm/val_accuracy is a validation figure, and this split has no "
        "validation windows; set data.val_fraction (e.g. 0.2) or data.val_groups"
    ) in proc.stdout + proc.stderr
    assert not (tmp_path / "sweep" / "summary.md").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset,model", [("svm", "svm"), ("resnet", "resnet")])
def test_an_optuna_search_tunes_on_validation_and_names_the_best_trial(
    tmp_path, tones, preset, model
):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m",
        f"hparams_search={preset}",
        "hydra.sweeper.n_trials=3",
        *TINY,
        f"data.root={tones}",
        f"hydra.sweep.dir={sweep}",
        RECORD,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = [sweep / str(i) for i in range(3)]
    metrics = [json.loads((t / "metrics.json").read_text()) for t in trials]
    assert all(list(m["models"]) == [model] for m in metrics)  # the preset's models
    # every trial returned its model's validation accuracy to the sweeper, not a test figure
    returned = [json.loads((t / "returned.json").read_text()) for t in trials]
    val = [m["models"][model]["val_accuracy"] for m in metrics]
    assert returned == val
    assert all(m["dataset"]["n_val"] > 0 for m in metrics)
    # the trials ran with the sampled settings, a different one each
    params = [OmegaConf.load(t / ".hydra" / "overrides.yaml") for t in trials]
    sampled = [tuple(o for o in p if o.split("=")[0] in _swept(preset)) for p in params]
    assert len(set(sampled)) == 3 and all(len(s) == len(_swept(preset)) for s in sampled)
    # the summary names the best trial by the validation figure, with its test figures only
    best = max(range(3), key=lambda i: val[i])  # the first of equal ones, as Optuna's
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == val[best]
    summary = json.loads((sweep / "summary.json").read_text())
    found = summary["search"]
    assert found["optimized_metric"] == f"{model}/val_accuracy"
    assert [t["objective"] for t in found["trials"]] == val
    assert found["best"]["dir"] == str(best) and found["optuna"]["agrees"]
    assert found["best"]["models"] == metrics[best]["models"]
    assert summary["settings"] == [] and all("accuracy" not in r for r in summary["runs"])
    md = (sweep / "summary.md").read_text()
    assert f"## Best trial: {best}\n" in md and f"| {best} (best) |" in md
    test_accuracy = f"| {model} | {metrics[best]['models'][model]['accuracy']:.4f} |"
    assert test_accuracy in md  # the best trial's test figures...
    assert md.count(f"| {model} | ") == 1  # ...and no other trial's
    html = (sweep / "summary.html").read_text()
    assert f"Best trial: {best}</h2>" in html and "data:image/png;base64," in html


def _swept(preset: str) -> set[str]:
    """The keys a preset's ``hydra.sweeper.params`` samples."""
    conf = OmegaConf.load(REPO / "conf" / "hparams_search" / f"{preset}.yaml")
    return set(conf.hydra.sweeper.params)
