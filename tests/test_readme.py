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


# --- The documentation's links and commands --------------------------------------------------

REPO = README.parent
DOCS = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks, whose brackets are not links."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {Path(t.split("#")[0]).as_posix() for t in LINK.findall(_prose(README.read_text()))}
    missing = [p.relative_to(REPO).as_posix() for p in DOCS]
    missing = [p for p in missing if p not in linked]
    assert not missing, f"README.md links none of {missing}: add a line each under Documentation"


@pytest.mark.parametrize("page", [README, REPO / "BENCHMARKS.md", *DOCS], ids=lambda p: p.name)
def test_every_relative_link_points_to_a_file(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        path = target.split("#")[0]
        if not path or re.match(r"[a-z]+:", path):  # an anchor in the page, or a URL
            continue
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.name} links to missing files: {broken}"


def run_commands(page: Path) -> list[list[str]]:
    """The arguments of every ``python -m pipeline.run`` command (also after ``torchrun ... -m``,
    or after ``&&``) in ``page``'s fenced bash blocks, as the shell would pass them."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                part, words = words[:end], words[end + 1 :]
                if "pipeline.run" in part and part[part.index("pipeline.run") - 1] == "-m":
                    commands.append(part[part.index("pipeline.run") + 1 :])
    return commands


def single_runs(args: list[str]) -> list[list[str]]:
    """A multirun (``-m``) as single runs that together take every value of every sweep
    (Hydra's ``--cfg job`` refuses ``-m``); a single run as itself."""
    if "-m" not in args and "--multirun" not in args:
        return [args]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    rest = [a for a in args if a not in ("-m", "--multirun")]
    parsed = OverridesParser.create().parse_overrides(rest)
    values = [
        list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.input_line] for o in parsed
    ]
    runs = []
    for i in range(max(len(v) for v in values)):
        run = []
        for o, v in zip(parsed, values, strict=True):
            run.append(f"{o.get_key_element()}={v[min(i, len(v) - 1)]}" if len(v) > 1 else v[0])
        runs.append(run)
    return runs


# Every fenced `python -m pipeline.run` command of README.md and docs/ is composed, not run: it
# goes through the real command line with `--cfg job` (the overrides checked, the configuration
# composed and printed, nothing read or trained). Not checked this way: the run of the default
# job inside the install command (the end-to-end tests run the CLI with tiny settings), torchrun's
# own arguments (only the overrides after `-m pipeline.run` are composed), and commands written
# with a `...` placeholder.
DOC_COMMANDS = [
    pytest.param(args, id=f"{page.name}:{' '.join(args)[:60]}")
    for page in [README, *DOCS]
    for args in run_commands(page)
    if "..." not in args
]


def test_the_readme_holds_the_commands_it_should():
    readme = [" ".join(a) for a in run_commands(README)]
    assert "" in readme  # the default job, after the install
    assert any(a.startswith("task=predict") for a in readme)
    assert any(a.startswith("-m seed=0,1,2") for a in readme)
    assert "--cfg job" in readme


@pytest.mark.parametrize("args", DOC_COMMANDS)
def test_every_documented_command_composes(args):
    import subprocess
    import sys

    from omegaconf import OmegaConf

    for single in single_runs(args):
        help_only = "--help" in single or "--hydra-help" in single  # prints, composes nothing
        cfg_args = single if help_only or "--cfg" in single else [*single, "--cfg", "job"]
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.run", *cfg_args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{' '.join(single)}:\n{done.stderr[-2000:]}"
        if help_only:
            continue
        cfg = OmegaConf.create(done.stdout)
        for arg in single:
            key = arg.split("=", 1)[0]
            if "=" not in arg or key.startswith(("hydra", "+", "~")) or "/" in key:
                continue
            if (REPO / "conf" / key).is_dir():  # a group choice: composing it checked it
                continue
            missing = object()
            got = OmegaConf.select(cfg, key, default=missing, throw_on_resolution_failure=False)
            assert got is not missing, f"{arg}: no {key} in the composed configuration"
