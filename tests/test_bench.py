"""The benchmarks run end to end on tiny inputs (their figures are not checked here)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from pipeline.bench.__main__ import main


def ratio_agrees(ratio: float, numerator: float, denominator: float) -> bool:
    """Whether a printed ratio (two decimals) fits two printed rates (whole numbers).

    On a busy machine 24 files give rates of a few files/s, where rounding each to a whole
    number moves their quotient by far more than the ratio's own rounding.
    """
    low = (numerator - 0.5) / (denominator + 0.5)
    high = math.inf if denominator < 1 else (numerator + 0.5) / (denominator - 0.5)
    return low - 0.005 - 1e-9 <= ratio <= high + 0.005 + 1e-9


def test_dispatcher_lists_and_rejects(capsys):
    assert main(["--help"]) == 0
    assert "predict" in capsys.readouterr().out
    assert main(["no-such-bench"]) == 2
    assert "unknown benchmark 'no-such-bench'" in capsys.readouterr().err


def test_predict_benchmark_prints_both_rates_and_the_ratio(capsys):
    assert main(["predict", "--files", "24", "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rates = {k: float(v) for k, v in re.findall(r"(pipeline|bare)\s+([\d.]+) files/s", out)}
    assert set(rates) == {"pipeline", "bare"} and all(v > 0 for v in rates.values())
    ratio = float(re.search(r"ratio pipeline/bare: ([\d.]+)", out).group(1))
    assert ratio_agrees(ratio, rates["pipeline"], rates["bare"])


def test_predict_benchmark_times_the_batch_norm_adaptation(capsys):
    argv = ["predict", "--files", "24", "--repeats", "1", "--device", "cpu", "--adapt-bn"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rates = dict(re.findall(r"(pipeline|adapt_bn|bare)\s+([\d.]+) files/s", out))
    assert set(rates) == {"pipeline", "adapt_bn", "bare"}
    ratio = float(re.search(r"ratio adapt_bn/pipeline: ([\d.]+)", out).group(1))
    assert ratio_agrees(ratio, float(rates["adapt_bn"]), float(rates["pipeline"]))


def test_train_benchmark_prints_both_rates_and_the_ratio(capsys):
    argv = [
        "train",
        "--images",
        "64",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--repeats",
        "1",
        "--size",
        "16",
        "16",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rates = {k: float(v) for k, v in re.findall(r"(pipeline|bare)\s+([\d.]+) images/s", out)}
    assert set(rates) == {"pipeline", "bare"} and all(v > 0 for v in rates.values())
    ratio = float(re.search(r"ratio pipeline/bare: ([\d.]+)", out).group(1))
    assert ratio_agrees(ratio, rates["pipeline"], rates["bare"])


def _scores(file_acc: float) -> dict:
    """A model's figures in a run's metrics.json, as the FSDD tables read them."""
    return {
        "accuracy": file_acc - 0.01,
        "macro_f1": file_acc - 0.02,
        "file_accuracy": file_acc,
        "train_seconds": 60.0,
    }


def _fold(speaker: str, seed: int, acc: float, *, counts=(3, 1), adapted=(2, 2)) -> dict:
    """A leave-one-speaker-out run's metrics.json: resnet scores ``acc``, the SVM 0.1 less;
    McNemar's discordant counts (resnet only, svm only) plain and adapted."""
    resnet = dict(_scores(acc), adapted_accuracy=acc + 0.04, adapted_file_accuracy=acc + 0.05)
    pair = {"n": 50, "p_value": 0.5, "p_holm": 0.5, "unit": "files"}
    return {
        "models": {"resnet": resnet, "svm": _scores(acc - 0.1)},
        "dataset": {"n_val": 0, "groups": {"train": [], "val": [], "test": [speaker]}},
        "significance": [
            {"a": "resnet", "b": "svm", **pair, "a_only": counts[0], "b_only": counts[1]},
            {"a": "svm", "b": "resnet adapted", **pair, "a_only": adapted[0], "b_only": adapted[1]},
        ],
        "run": {
            "device": "cpu",
            "precision": "bfloat16",
            "seed": seed,
            "git_commit": "0123456789abcdef-dirty",
        },
    }


def _sweep(folder: Path, runs: list[tuple[str, dict]]) -> Path:
    """A finished sweep as Hydra and the sweep summary leave it: one run folder per job
    (metrics.json and .hydra/overrides.yaml, from ``(setting override, metrics)``),
    multirun.yaml and summary.json."""
    import json

    from omegaconf import OmegaConf

    from pipeline import atomic, summary

    for job, (override, metrics) in enumerate(runs):
        run = folder / str(job)
        (run / ".hydra").mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(metrics))
        overrides = [o for o in (override, f"seed={metrics['run']['seed']}") if o]
        OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    task = ["+experiment=fsdd", "seed=0,1"]
    saved = {"task": task, "hydra": [f"hydra.sweep.dir={folder}", "hydra.mode=MULTIRUN"]}
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": saved}}), folder / "multirun.yaml")
    atomic.write_json(folder / "summary.json", summary.summarise(folder))
    return folder


def _loso(folder: Path, **kwargs) -> Path:
    """Two folds (theo: resnet 0.9 and 0.7 by seed; lucas: 1.0 twice), two seeds each."""
    runs = [
        (f"data.test_groups=[{speaker}]", _fold(speaker, seed, acc, **kwargs))
        for speaker, accs in (("theo", (0.9, 0.7)), ("lucas", (1.0, 1.0)))
        for seed, acc in enumerate(accs)
    ]
    return _sweep(folder, runs)


def _render(runs: Path, *args: str) -> str:
    output = runs / "BENCH.md"
    argv = ["fsdd", "--render-only", "--runs", str(runs), "--output", str(output), *args]
    assert main(argv) == 0
    return output.read_text()


def test_fsdd_benchmark_is_two_ordinary_multiruns(tmp_path):
    from pipeline.bench.fsdd import SPEAKERS, commands

    sweeps = commands(
        tmp_path / "rec",
        runs=tmp_path / "runs",
        seeds="0,1",
        speakers=SPEAKERS,
        official=True,
        overrides=["train.epochs=3"],
    )
    assert list(sweeps) == ["official", "loso"]
    common = [
        "-m",
        "pipeline.run",
        "-m",
        "+experiment=fsdd",
        f"data.root={tmp_path / 'rec'}",
        "seed=0,1",
        "progress=false",
        "train.epochs=3",
    ]
    assert sweeps["official"][1:] == [*common, f"hydra.sweep.dir={tmp_path / 'runs/official'}"]
    folds = "data.test_groups=[george],[jackson],[lucas],[nicolas],[theo],[yweweler]"
    loso = [*common, "data.split=group", folds, f"hydra.sweep.dir={tmp_path / 'runs/loso'}"]
    assert sweeps["loso"][1:] == loso
    only = commands(
        tmp_path, runs=tmp_path, seeds="0", speakers=["theo"], official=False, overrides=[]
    )
    assert list(only) == ["loso"] and "data.test_groups=[theo]" in only["loso"]


def test_fsdd_tables_give_mean_and_std_over_seeds_from_the_sweep_summary(tmp_path):
    _loso(tmp_path / "loso")
    official = [("", _fold("all", seed, acc)) for seed, acc in ((0, 0.99), (1, 0.97))]
    _sweep(tmp_path / "official", official)
    text = _render(tmp_path)
    assert "each score is the mean ± standard deviation over the seeds (0, 1)" in text
    assert "| held-out speaker | resnet | svm | resnet adapted |" in text
    assert "| theo | 0.8000 ± 0.1414 | 0.7000 ± 0.1414 | 0.8500 ± 0.1414 |" in text  # ddof 1
    assert "| lucas | 1.0000 ± 0.0000 | 0.9000 ± 0.0000 | 1.0500 ± 0.0000 |" in text
    # per seed the mean over the folds (0.95, 0.85), then their mean and std over the seeds
    assert "| **mean** | **0.9000 ± 0.0707** | **0.8000 ± 0.0707** | **0.9500 ± 0.0707** |" in text
    # the official split's table is the sweep summary's own (best mean in bold)
    assert "| resnet | **0.9700 ± 0.0141** |" in text
    # the commands as Hydra recorded them in each sweep folder, official split first
    commands = re.findall(r"^python -m pipeline.run -m .*$", text, flags=re.M)
    assert commands == [
        f"python -m pipeline.run -m +experiment=fsdd seed=0,1 hydra.sweep.dir={tmp_path / name}"
        for name in ("official", "loso")
    ]
    assert "at commit 0123456-dirty" in text


def test_fsdd_header_names_the_precision_and_the_kind_of_cpu(tmp_path):
    """The same seed scores differently on another kind of CPU, so the tables name theirs."""
    _loso(tmp_path / "loso")
    line = next(ln for ln in _render(tmp_path, "--no-official").splitlines() if "Machine:" in ln)
    assert "Machine: cpu (bfloat16); " in line
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.M)
        if names:
            assert " ".join(names[0].split()) in line


def test_fsdd_pools_mcnemar_over_the_folds_files(tmp_path):
    from scipy.stats import binomtest

    from pipeline.bench.fsdd import pooled_mcnemar, read_sweep
    from pipeline.metrics import holm

    settings = read_sweep(_loso(tmp_path / "loso", counts=(3, 1), adapted=(1, 4)))["settings"]
    rows = pooled_mcnemar(settings)
    # per seed, the two folds' discordant counts add up: 6 against 2, adapted 2 against 8
    got = [(r["a"], r["b"], r["seed"], r["n"], r["a_only"], r["b_only"]) for r in rows]
    assert got == [
        ("resnet", "svm", 0, 100, 6, 2),
        ("svm", "resnet adapted", 0, 100, 2, 8),
        ("resnet", "svm", 1, 100, 6, 2),
        ("svm", "resnet adapted", 1, 100, 2, 8),
    ]
    p = holm([binomtest(*c, 0.5).pvalue for c in ((6, 8), (2, 10)) * 2])
    assert [r["p_holm"] for r in rows] == pytest.approx(p)
    text = _render(tmp_path, "--no-official")
    assert "| svm vs resnet adapted | 1 | 100 | 2 | 8 |" in text
    # a pair that one fold did not test is left out of that seed, not summed over the others
    settings[1]["metrics"][0]["significance"] = settings[1]["metrics"][0]["significance"][1:]
    got = [(r["a"], r["b"], r["seed"]) for r in pooled_mcnemar(settings)]
    assert got == [("svm", "resnet adapted", 0), ("resnet", "svm", 1), ("svm", "resnet adapted", 1)]


def test_fsdd_benchmark_rewrites_only_its_own_section(tmp_path):
    """The development suite's section and hand-written notes outside the markers are kept."""
    _loso(tmp_path / "loso")
    old = (
        "<!-- suite -->\nthe table\n<!-- /suite -->\n\n# FSDD\nhand-written notes\n\n"
        "<!-- fsdd -->\nold tables\n<!-- /fsdd -->\n\nPublished figures\n"
    )
    (tmp_path / "BENCH.md").write_text(old)
    text = _render(tmp_path, "--no-official")
    assert "old tables" not in text and "| theo |" in text
    head, tail = old.split("<!-- fsdd -->")[0], old.split("<!-- /fsdd -->")[1]
    assert text.startswith(head + "<!-- fsdd -->\n") and text.endswith("<!-- /fsdd -->" + tail)
    assert _render(tmp_path, "--no-official") == text  # rendering again changes nothing


def test_fsdd_render_only_needs_finished_sweeps(tmp_path, capsys):
    argv = ["fsdd", "--render-only", "--runs", str(tmp_path), "--output", str(tmp_path / "B.md")]
    assert main(argv) == 2
    assert f"{tmp_path / 'official' / 'summary.json'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "B.md").exists()


def test_fsdd_refuses_to_run_into_an_existing_sweep_folder(tmp_path, capsys):
    """Hydra would keep the old jobs beyond the new sweep's last, and the summary count them."""
    (tmp_path / "loso").mkdir()
    argv = ["fsdd", "--root", str(tmp_path), "--runs", str(tmp_path), "--no-official"]
    assert main(argv) == 2
    assert f"{tmp_path / 'loso'} already exist: render them with --render-only" in (
        capsys.readouterr().err
    )


def _tones(folder: Path, *, speakers: str, takes: int) -> Path:
    """FSDD-like files ``<digit>_<speaker>_<take>.wav`` at 8 kHz: digit d is a tone of
    (d + 2) x 100 Hz, 0.3 s, each speaker a little higher or lower and noisy."""
    import numpy as np
    import soundfile as sf

    folder.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(2400) / 8000
    for digit in range(3):
        for k, speaker in enumerate(speakers.split(",")):
            for take in range(takes):
                tone = np.sin(2 * np.pi * (digit + 2) * 100 * (1 + 0.03 * k) * t)
                noisy = 0.5 * tone + 0.05 * rng.standard_normal(t.size)
                sf.write(folder / f"{digit}_{speaker}_{take}.wav", noisy.astype(np.float32), 8000)
    return folder


@pytest.mark.slow
def test_fsdd_benchmark_end_to_end_on_tiny_tones(tmp_path):
    """python -m pipeline.bench fsdd as a user runs it: two multiruns (SVM only, one seed)."""
    import subprocess
    import sys

    from pipeline.bench.fsdd import REPO

    root = _tones(tmp_path / "recordings", speakers="anna,bob,carl", takes=7)
    output = tmp_path / "BENCH.md"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.bench",
        "fsdd",
        "--root",
        str(root),
        "--runs",
        str(tmp_path / "runs"),
        "--output",
        str(output),
        "--speakers",
        "anna,bob",
        "--seeds",
        "0",
        "models=[svm]",
        "svm.cv=2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = output.read_text()
    assert "### Official split" in text and "one run each, seed 0" in text
    assert re.search(r"^\| anna \| [\d.]+ \|$", text, flags=re.M), text
    assert re.search(r"^\| bob \| [\d.]+ \|$", text, flags=re.M), text
    assert "'data.test_groups=[anna],[bob]'" in text
    for sweep in ("official", "loso"):
        assert (tmp_path / "runs" / sweep / "summary.json").is_file()


def test_holm_adjusts_in_the_given_order():
    from pipeline.metrics import holm

    # sorted: 0.01 * 3, 0.02 * 2, 0.04 * 1 -> 0.03, 0.04, 0.04 (monotone), back in order
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
