"""Real-data benchmark on the Free Spoken Digit Dataset: two ordinary multiruns of the CLI.

``python -m pipeline.bench fsdd [--root ../shared/datasets/fsdd/recordings] [--seeds 0,1]``
runs, exactly as a user would,

1. the official split (takes 0-4 of every speaker are the test set), once per seed::

       python -m pipeline.run -m +experiment=fsdd data.root=<root> seed=0,1 \\
           hydra.sweep.dir=<runs>/official

2. leave one speaker out: one fold per speaker, each held out once, once per seed::

       python -m pipeline.run -m +experiment=fsdd data.root=<root> seed=0,1 \\
           data.split=group data.test_groups=[george],[jackson],...,[yweweler] \\
           hydra.sweep.dir=<runs>/loso

Each sweep folder is the record: a run folder per job and the sweep summary
(``summary.json``, mean ± std per setting and model) that every multirun writes. The
benchmark then renders ``pipeline/templates/bench_fsdd.md.j2`` from those files into
``--output`` between ``<!-- fsdd -->`` and ``<!-- /fsdd -->``, leaving the rest of the file
(hand-written notes, the development suite's section) as it is. ``--render-only`` renders
again from finished sweeps. Extra arguments are Hydra overrides for every run, so an
ablation is the same benchmark with an override and its own ``--runs`` and ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipeline import atomic, summary
from pipeline.metrics import holm, mcnemar_p
from pipeline.report import templates
from pipeline.runtime import cpu_bf16_units

SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
REPO = Path(__file__).resolve().parents[2]
SECTION = "fsdd"  # the <!-- fsdd --> ... <!-- /fsdd --> markers in --output


def commands(
    root: Path, *, runs: Path, seeds: str, speakers: list[str], official: bool, overrides: list[str]
) -> dict[str, list[str]]:
    """The multirun command of each sweep ({sweep folder name: argv}), official split first."""
    run = [sys.executable, "-m", "pipeline.run", "-m", "+experiment=fsdd"]
    base = [*run, f"data.root={root}", f"seed={seeds}", "progress=false", *overrides]
    folds = "data.test_groups=" + ",".join(f"[{s}]" for s in speakers)
    sweeps = {"official": [*base, f"hydra.sweep.dir={runs / 'official'}"]} if official else {}
    sweeps["loso"] = [*base, "data.split=group", folds, f"hydra.sweep.dir={runs / 'loso'}"]
    return sweeps


def run_sweeps(sweeps: dict[str, list[str]], runs: Path) -> int:
    """Run each multirun in turn, its output streaming through; the first failure's exit code.
    An existing sweep folder is refused: Hydra would keep its jobs beyond the new sweep's last."""
    taken = [str(runs / name) for name in sweeps if (runs / name).exists()]
    if taken:
        hint = "render them with --render-only, or give another --runs"
        print(f"{', '.join(taken)} already exist: {hint}", file=sys.stderr)
        return 2
    for name, cmd in sweeps.items():
        print("+ python", shlex.join(cmd[1:]), flush=True)
        code = subprocess.run(cmd, cwd=REPO).returncode
        if code:
            print(f"the {name} sweep failed (exit {code}); see {runs / name}", file=sys.stderr)
            return code
    return 0


def read_sweep(sweep_dir: Path) -> dict:
    """A finished sweep's ``summary.json``, each setting with its runs' ``metrics.json``, and
    the command that ran it (from Hydra's ``multirun.yaml``) under ``command``.

    Raises:
        FileNotFoundError: ``sweep_dir`` holds no sweep summary.
    """
    path = sweep_dir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the sweep did not finish; run it again")
    found = json.loads(path.read_text(encoding="utf-8"))
    for setting in found["settings"]:
        setting["metrics"] = [
            json.loads((sweep_dir / d / "metrics.json").read_text("utf-8")) for d in setting["runs"]
        ]
    saved = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides
    args = [*saved.task, *(o for o in saved.hydra if o.startswith("hydra.sweep.dir="))]
    found["command"] = "python -m pipeline.run -m " + shlex.join(args)
    return found


def loso_table(sweep: dict) -> dict:
    """The leave-one-speaker-out table: one row per fold (its speaker, from the runs' own
    split), one column per model's file accuracy (window accuracy where files were not cut)
    and per network's adapted figure, each the sweep summary's mean ± std over seeds."""
    settings = sweep["settings"]
    first = settings[0]["models"]
    key = "file_accuracy" if all("file_accuracy" in m for m in first.values()) else "accuracy"
    cols = [(n, key) for n in first]
    cols += [(n, f"adapted_{key}") for n in first if f"adapted_{key}" in first[n]]
    folds = [
        {
            "speaker": ", ".join(s["metrics"][0]["dataset"]["groups"]["test"]),
            "cells": [s["models"].get(n, {}).get(k) for n, k in cols],
        }
        for s in settings
    ]
    return {
        "unit": "file" if key == "file_accuracy" else "window",
        "columns": [n + (" adapted" if k.startswith("adapted_") else "") for n, k in cols],
        "adapted": len(cols) > len(first),
        "validated": bool(settings[0]["metrics"][0]["dataset"].get("n_val")),
        "folds": folds,
        "mean": [mean_over_folds(settings, n, k) for n, k in cols],
    }


def mean_over_folds(settings: list[dict], name: str, key: str) -> dict | None:
    """Mean and std (ddof 1) over seeds of the mean over the folds of one figure; None if a
    fold lacks it. The sweep summary averages each fold over seeds, not the folds."""
    per_seed: dict[int, list[float]] = {}
    for s in settings:
        if key not in s["models"].get(name, {}):
            return None
        for seed, value in zip(s["seeds"], s["models"][name][key]["values"], strict=True):
            per_seed.setdefault(seed, []).append(value)
    means = [float(np.mean(v)) for v in per_seed.values()]
    std = float(np.std(means, ddof=1)) if len(means) > 1 else None
    return {"mean": float(np.mean(means)), "std": std}


def pooled_mcnemar(settings: list[dict]) -> list[dict]:
    """McNemar's exact test of every pair of models over all the folds' test files, per seed.

    Each file is tested once per seed, by the fold that held its speaker out, so the discordant
    counts of the folds' own tests (metrics.json ``significance``, adapted networks included)
    add up to those of one test on every file. A pair is left out of a seed unless every fold
    tested it with that seed; p is Holm-adjusted over all the rows.
    """
    by_seed: dict[int, list[dict]] = {}
    for s in settings:
        for seed, metrics in zip(s["seeds"], s["metrics"], strict=True):
            tests = {(t["a"], t["b"]): t for t in metrics.get("significance", [])}
            by_seed.setdefault(seed, []).append(tests)
    rows = []
    for seed, folds in by_seed.items():
        for a, b in folds[0] if len(folds) == len(settings) else []:
            tested = [fold[a, b] for fold in folds if (a, b) in fold]
            if len(tested) == len(folds):
                counts = {k: sum(t[k] for t in tested) for k in ("n", "a_only", "b_only")}
                rows.append({"a": a, "b": b, "seed": seed, "unit": tested[0]["unit"], **counts})
    adjusted = holm([mcnemar_p(r["a_only"], r["b_only"]) for r in rows])
    return [dict(r, p_holm=p) for r, p in zip(rows, adjusted, strict=True)]


def render(sweeps: dict[str, dict]) -> str:
    """The FSDD section from the finished sweeps (``official`` and/or ``loso``)."""
    official, loso = sweeps.get("official"), sweeps.get("loso")
    first = next(iter(sweeps.values()))["settings"][0]
    header, rows = summary.table(official["settings"][0]) if official else ([], [])
    page = templates(html=False).get_template("bench_fsdd.md.j2")
    return page.render(
        date=time.strftime("%Y-%m-%d"),
        commit=first["metrics"][0]["run"].get("git_commit") or "unknown",
        machine=_device_line(first["metrics"][0]),
        seeds=first["seeds"],
        commands=[s["command"] for s in sweeps.values()],
        official={"header": header, "rows": rows} if official else None,
        loso=loso_table(loso) if loso else None,
        pooled=pooled_mcnemar(loso["settings"]) if loso else [],
    )


def splice(text: str, name: str, section: str) -> str:
    """Put ``section`` between ``<!-- name -->`` and ``<!-- /name -->`` in ``text``
    (replacing what was there, or appending)."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"


def _device_line(metrics: dict) -> str:
    """``cuda (NVIDIA H200, bfloat16); 16 CPU cores (...)``: the same run with the same seed
    scores differently on another kind of CPU or GPU, so the tables name theirs."""
    run = metrics.get("run", {})
    device = run.get("device", "?")
    detail = [run["precision"]] if run.get("precision") else []
    if "cuda" in str(device) and torch.cuda.is_available():
        detail.insert(0, torch.cuda.get_device_name())
    if detail:
        device = f"{device} ({', '.join(detail)})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{device}; {cores} CPU cores ({_cpu_name()})"


def _cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one) and its native bf16 units."""
    try:
        found = re.search(r"^model name\s*:(.*)$", Path("/proc/cpuinfo").read_text(), flags=re.M)
    except OSError:
        found = None
    name = " ".join(found[1].split()) if found else ""
    return ", ".join([name or platform.processor() or platform.machine(), *cpu_bf16_units()])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench fsdd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", default=str(REPO.parent / "shared/datasets/fsdd/recordings"))
    parser.add_argument("--runs", default="outputs/bench-fsdd", help="folder for the sweeps")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--speakers", default=",".join(SPEAKERS), help="held-out speakers")
    parser.add_argument("--seeds", default="0,1", metavar="S,S,...", help="seeds of every run")
    parser.add_argument("--no-official", action="store_true", help="skip the official split")
    parser.add_argument("--render-only", action="store_true", help="render finished sweeps")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"\d+(,\d+)*", args.seeds):
        parser.error(f"--seeds={args.seeds!r} must be whole numbers joined by commas, e.g. 0,1")
    root, runs = Path(args.root).resolve(), Path(args.runs).resolve()
    sweeps = commands(
        root,
        runs=runs,
        seeds=args.seeds,
        speakers=args.speakers.split(","),
        official=not args.no_official,
        overrides=args.overrides,
    )
    if not args.render_only:
        if not root.is_dir():
            print(f"--root={root} does not exist; point it at fsdd/recordings", file=sys.stderr)
            return 2
        code = run_sweeps(sweeps, runs)
        if code:
            return code
    try:
        found = {name: read_sweep(runs / name) for name in sweeps}
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    output = Path(args.output)
    old = output.read_text(encoding="utf-8") if output.exists() else ""
    atomic.write_text(output, splice(old, SECTION, render(found)))
    print(f"wrote the FSDD section of {output}")
    return 0
