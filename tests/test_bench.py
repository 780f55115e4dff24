"""The benchmarks run end to end on tiny inputs (their figures are not checked here)."""

from __future__ import annotations

import re

from pipeline.bench.__main__ import main


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
    assert abs(ratio - rates["pipeline"] / rates["bare"]) < 0.02 * ratio + 0.01


def test_train_benchmark_prints_both_rates_and_the_ratio(capsys):
    argv = ["train", "--images", "64", "--batch-size", "32", "--epochs", "1", "--repeats", "1",
            "--size", "16", "16", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    rates = {k: float(v) for k, v in re.findall(r"(pipeline|bare)\s+([\d.]+) images/s", out)}
    assert set(rates) == {"pipeline", "bare"} and all(v > 0 for v in rates.values())
    assert "ratio pipeline/bare:" in out
