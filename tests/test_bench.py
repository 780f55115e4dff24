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
    argv = ["train", "--images", "64", "--batch-size", "32", "--epochs", "1", "--repeats", "1",
            "--size", "16", "16", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    rates = {k: float(v) for k, v in re.findall(r"(pipeline|bare)\s+([\d.]+) images/s", out)}
    assert set(rates) == {"pipeline", "bare"} and all(v > 0 for v in rates.values())
    ratio = float(re.search(r"ratio pipeline/bare: ([\d.]+)", out).group(1))
    assert ratio_agrees(ratio, rates["pipeline"], rates["bare"])


def _fold(acc: float, file_acc: float, seconds: float = 60.0) -> dict:
    """The parts of a run's metrics.json that the FSDD tables read."""
    scores = {"accuracy": acc, "macro_f1": acc - 0.01, "file_accuracy": file_acc,
              "train_seconds": seconds, "best_epoch": 3}  # fmt: skip
    return {
        "models": {"resnet": dict(scores), "svm": dict(scores, file_accuracy=file_acc - 0.1)},
        "dataset": {"n_val": 0},
        "histories": {},
        "run": {"device": "cpu"},
    }


def test_fsdd_tables_give_mean_and_std_over_seeds():
    from pipeline.bench.fsdd import merge_seeds, render

    merged = merge_seeds([_fold(0.80, 0.90, 50), _fold(0.70, 0.70, 70)])
    r = merged["models"]["resnet"]
    assert r["seeds"] == 2 and r["file_accuracy"] == pytest.approx(0.80)
    assert r["std"]["file_accuracy"] == pytest.approx(0.1414, abs=1e-4)  # ddof 1
    assert r["train_seconds"] == pytest.approx(60)
    assert merge_seeds([_fold(0.8, 0.9)]) == _fold(0.8, 0.9)  # one seed: as it was

    results = {"loso-theo": merged, "loso-lucas": merge_seeds([_fold(1.0, 1.0), _fold(1.0, 1.0)])}
    text = render(results, {}, models=["resnet", "svm"], commands=[], extra=[], seeds="0,1")
    assert "Every setting ran once per seed (0, 1)" in text
    assert "| theo | 0.8000 ± 0.1414 | 0.7000 ± 0.1414 |" in text
    assert "| lucas | 1.0000 ± 0.0000 | 0.9000 ± 0.0000 |" in text
    assert "| **mean** | **0.9000** | **0.8000** |" in text
    assert "only 2 of six speakers so far" in text  # the targets read the means


def test_fsdd_header_names_the_precision_and_the_kind_of_cpu():
    """The same seed scores differently on another kind of CPU, so the tables name theirs."""
    from pipeline.bench.fsdd import render

    fold = _fold(0.9, 0.9)
    fold["run"]["precision"] = "bfloat16"
    header = render({"loso-theo": fold}, {}, models=["resnet", "svm"], commands=[], extra=[])
    line = next(ln for ln in header.splitlines() if "Machine:" in ln)
    assert "Machine: cpu (bfloat16); " in line
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.M)
        if names:
            assert " ".join(names[0].split()) in line


def test_fsdd_pools_mcnemar_over_the_folds_files():
    from scipy.stats import binomtest

    from pipeline.bench.fsdd import merge_seeds, render
    from pipeline.metrics import holm

    folds = {}
    for speaker, (a_only, b_only) in (("theo", (3, 1)), ("lucas", (4, 0))):
        m = _fold(0.9, 0.9)
        m["significance"] = [{"a": "resnet", "b": "svm", "n": 50, "a_only": a_only,
                              "b_only": b_only, "p_value": 0.5, "unit": "files"}]  # fmt: skip
        # resnet right on files 0-39, svm on 5-44 (theo) or 10-49 (lucas): 5 or 10 each way;
        # svm's files in the reverse order: they are paired by name
        shift = 5 if speaker == "theo" else 10
        m["adapted"] = {"resnet": 0.8, "svm": 0.8}
        m["adapted_files"] = {
            "resnet": {f"{i}_{speaker}.wav": i < 40 for i in range(50)},
            "svm": {f"{i}_{speaker}.wav": shift <= i < 40 + shift for i in reversed(range(50))},
        }
        folds[f"loso-{speaker}"] = m
    text = render(folds, {}, models=["resnet", "svm"], commands=[], extra=[])
    assert "### McNemar's test over all held-out files" in text
    # the folds' discordant counts add up: 7 against 1; then 15 against 15 adapted
    p = holm([binomtest(7, 8, 0.5).pvalue, binomtest(15, 30, 0.5).pvalue])
    assert f"| resnet vs svm | 100 | 7 | 1 | {p[0]:.3g} |" in text
    assert f"| resnet vs svm adapted | 100 | 15 | 15 | {p[1]:.3g} |" in text
    # a pair that one fold did not test is left out, not summed over the others
    folds["loso-lucas"]["significance"] = []
    text = render(folds, {}, models=["resnet", "svm"], commands=[], extra=[])
    assert "| resnet vs svm |" not in text and "| resnet vs svm adapted |" in text
    # merged over seeds, each file counted once per seed: no pooled test
    merged = {k: merge_seeds([m, m]) for k, m in folds.items()}
    text = render(merged, {}, models=["resnet", "svm"], commands=[], extra=[], seeds="0,1")
    assert "McNemar's test over all held-out files" not in text


def test_holm_adjusts_in_the_given_order():
    from pipeline.metrics import holm

    # sorted: 0.01 * 3, 0.02 * 2, 0.04 * 1 -> 0.03, 0.04, 0.04 (monotone), back in order
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_fsdd_reuses_a_run_folder_only_with_the_same_config_and_precision(tmp_path):
    import json

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.bench.fsdd import REPO, _same_config
    from pipeline.runtime import precision, resolve_device

    overrides = ["+experiment=fsdd", "data.split=group", "data.test_groups=[theo]"]
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    here = precision(resolve_device(cfg.device), cfg.train.amp)
    for used, same in ((here, True), (None, True), ("float16", False)):
        run = {} if used is None else {"precision": used}
        (tmp_path / "metrics.json").write_text(json.dumps({"run": run}))
        assert _same_config(tmp_path, overrides) is same
    assert not _same_config(tmp_path, [*overrides, "train.epochs=3"])
