"""The README's examples run as written (with tiny data in place of the default dataset)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from tests.conftest import write_tone_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(heading: str) -> str:
    """The first fenced python block under the README heading ``heading``."""
    text = README.read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


@pytest.mark.slow
def test_the_notebook_example_trains_saves_and_predicts_a_folder(tmp_path, monkeypatch, capsys):
    code = python_block("## From Python, without Hydra")
    assert code.count('Path("data/synthetic")') == 2
    data = write_tone_dataset(tmp_path / "tones", n_per_class=10, rate=4000, seconds=1.0)
    code = code.replace('Path("data/synthetic")', f"Path({str(data)!r})")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    classified, accuracy = capsys.readouterr().out.split()[-2:]
    assert int(classified) == 30 and float(accuracy) > 0.5  # three tones, chance is 1/3
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and {r["predicted"] for r in rows} <= {"low", "mid", "high"}
    assert (tmp_path / "my_model" / "bundle.json").is_file()
