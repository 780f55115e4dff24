"""The development suite: the default recipe, untuned, on every kind of data the tool is for.

``python -m pipeline.bench suite`` runs ``python -m pipeline.run`` as a new user would, with
no setting beyond each dataset's own facts (rate, layout, split, label and group regexes,
channels), on

1. ``default``: the embedded default job (rotating-machine vibration, 7 classes);
2. ``gunpoint``: UCR GunPoint's predefined split (50 training series of 150 samples), from
   ``--gunpoint`` (``../shared/datasets/gunpoint``);
3. ``traces``: generated short traces (128 samples, 3 channels) whose class is a tone's
   frequency (:mod:`pipeline.bench.traces`);
4. ``fsdd-tiny``: FSDD with 5 training files per class (the official test files): small data;
5. ``fsdd-official``: FSDD's official split (takes 0-4 are the test set);
6. ``fsdd-theo``, ``fsdd-nicolas``: one FSDD speaker held out each;
7. ``fsdd-preset``: the official split with the tuned preset (``+experiment=fsdd``), to show
   what the preset still adds over the default recipe.

Each quick dataset runs once per ``--seeds`` (default 0,1,2); the FSDD ones, which take
minutes a run on a CPU, once per ``--slow-seeds`` (default 0). A row leaves out the
``--models`` that would take it hours (the 1-D ResNet on the default job's 4,000-sample
windows; the raw-window models on FSDD); its table cells say so with a dash. The table
(test accuracy mean ± std over seeds of each of the five models, the ResNet's lead over its
plain twin and how many runs McNemar's test found it significant, each model's training
seconds, seconds per run) is printed and written into ``--output`` between ``<!-- suite -->``
markers, leaving the rest of the file as it is. A finished run folder of
the same configuration is read back, so an interrupted suite resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from pipeline import atomic
from pipeline.bench.fsdd import REPO, _device_line, splice
from pipeline.bench.traces import write_traces
from pipeline.runtime import precision, resolve_device

MODELS = ("resnet", "plain_cnn", "svm", "resnet1d", "minirocket")
HEADS = ("ResNet", "plain twin", "SVM", "1-D ResNet", "MiniRocket")
RAW = ("resnet1d", "minirocket")  # the models of raw windows
FSDD_OFFICIAL = ["data.split=regex", "data.test_regex='_[0-4]\\.wav$'"]


@dataclass(frozen=True)
class Dataset:
    """One row of the suite: the overrides that describe the data, and what to compare with."""

    name: str
    what: str
    overrides: list[str]
    slow: bool = False
    published: str = ""
    needs: Path | None = None  # a shared folder the row reads; skipped where it is missing
    # Models the row leaves out of --models: the 1-D ResNet on long windows (a run of the
    # default job's 4,000-sample windows takes about 50 minutes on a 2-core CPU, 12 windows
    # a second) and the raw-window models on FSDD's clips, never measured there.
    skip: tuple[str, ...] = ()


def datasets(args, runs: Path) -> list[Dataset]:
    fsdd = Path(args.fsdd).resolve()
    gunpoint = Path(args.gunpoint).resolve()
    fsdd_data = ["data=folder", f"data.root={fsdd}", "data.label_regex='^(\\d+)_'"]
    speakers = [*fsdd_data, "data.group_regex='^\\d+_([a-z]+)_'", "data.split=group"]

    def fsdd_row(name: str, what: str, overrides: list[str], **kw) -> Dataset:
        return Dataset(name, what, overrides, slow=True, needs=fsdd, skip=RAW, **kw)

    return [
        Dataset(
            "default",
            "embedded default job (vibration, 7 classes, 1 s at 4 kHz)",
            [],
            skip=("resnet1d",),
        ),
        Dataset(
            "gunpoint",
            "UCR GunPoint, predefined split (150-sample traces)",
            ["data=folder", f"data.root={gunpoint}", "data.sample_rate=1"],
            published="1-D ResNet 0.991, 1-NN 0.913 (Fawaz et al. 2019)",
            needs=gunpoint,
        ),
        Dataset(
            "traces",
            "generated 3-channel traces, class = a tone's frequency (128 samples)",
            [
                "data=folder",
                f"data.root={runs / 'traces'}",
                "data.sample_rate=100",
                "data.channels=all",
            ],
        ),
        Dataset(
            "fsdd-tiny",
            "FSDD, 5 training files per class, official test files",
            ["data=folder", f"data.root={fsdd}", f"data.manifest={runs / 'fsdd-tiny.csv'}"],
            needs=fsdd,
            skip=RAW,
        ),
        fsdd_row(
            "fsdd-official",
            "FSDD official split (whole clips, 8 kHz)",
            [*fsdd_data, *FSDD_OFFICIAL],
            published="preset: 0.993 (BENCHMARKS.md below)",
        ),
        *(
            fsdd_row(
                f"fsdd-{who}",
                f"FSDD, speaker {who} held out",
                [*speakers, f"data.test_groups=[{who}]"],
            )
            for who in ("theo", "nicolas")
        ),
        fsdd_row(
            "fsdd-preset",
            "FSDD official split with the tuned preset (+experiment=fsdd)",
            ["+experiment=fsdd", f"data.root={fsdd}"],
        ),
    ]


def write_tiny_manifest(fsdd: Path, path: Path, *, per_class: int = 5, seed: int = 0) -> Path:
    """A manifest of FSDD with ``per_class`` training files per digit (drawn over all
    speakers with a fixed seed from the official training takes) and every official test
    file (takes 0-4)."""
    rng = np.random.default_rng(seed)
    rows = []
    files = sorted(fsdd.glob("*.wav"))
    for digit in range(10):
        mine = [f for f in files if f.name.startswith(f"{digit}_")]
        train = [f for f in mine if not re.search(r"_[0-4]\.wav$", f.name)]
        test = [f for f in mine if re.search(r"_[0-4]\.wav$", f.name)]
        picked = rng.choice(len(train), per_class, replace=False)
        rows += [(str(train[i]), digit, "train") for i in sorted(picked)]
        rows += [(str(f), digit, "test") for f in test]
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return path


def summarise(runs: list[dict]) -> dict:
    """Mean and std of each model's test accuracy over runs, the ResNet's lead over its
    twin, the significant runs, the window counts and the seconds per run."""
    out = {"n": len(runs), "models": {}}
    for model in MODELS:
        acc = [r["models"][model]["accuracy"] for r in runs if model in r["models"]]
        if acc:
            out["models"][model] = (float(np.mean(acc)), float(np.std(acc)))
            seconds = [r["models"][model]["train_seconds"] for r in runs]
            out.setdefault("train_seconds", {})[model] = float(np.mean(seconds))
    lead = [r["models"]["resnet"]["accuracy"] - r["models"]["plain_cnn"]["accuracy"] for r in runs]
    out["lead"] = (float(np.mean(lead)), float(np.std(lead)))
    out["significant"] = sum(
        any(
            {p["a"], p["b"]} == {"resnet", "plain_cnn"} and p["p_holm"] < 0.05
            for p in r["significance"]
        )
        for r in runs
    )
    d = runs[0]["dataset"]
    out["windows"] = (d["n_train"], d["n_val"], d["n_test"])
    out["seconds"] = float(np.mean([r.get("_wall_seconds", np.nan) for r in runs]))
    out["image"] = runs[0]["features"]["image_shape"]
    out["steps"] = runs[0]["models"]["resnet"].get("training", {})
    return out


def _seconds(row: dict) -> str:
    """Each model's mean training time in seconds, in the table's column order."""
    times = row.get("train_seconds", {})
    return " / ".join(f"{times[m]:.1f}" if m in times else "—" for m in MODELS)


def _pm(mean_std: tuple[float, float], n: int) -> str:
    mean, std = mean_std
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def render(rows: dict[str, dict], sets: dict[str, Dataset], *, machine: str, commands) -> str:
    lines = [
        "# Development suite: the default recipe on data nobody tuned for",
        "",
        f"Generated by `python -m pipeline.bench suite` on {time.strftime('%Y-%m-%d')}. "
        f"Machine: {machine}. Every run is `python -m pipeline.run` with only the data's own "
        "facts (rate, layout, split, label and group regexes, channels); the commands are at "
        "the end of this section. Test accuracy per window (FSDD's whole clips: per file), "
        "mean ± standard deviation over the seeds; *lead* is ResNet minus plain twin, with the "
        "number of runs where McNemar's test (Holm) found the two different.",
        "",
        "| dataset | windows train/val/test | image | steps (batch) | "
        + " | ".join(HEADS)
        + " | ResNet − twin (significant runs) | published | seeds | training s per model "
        "| s per run |",
        "|---|---|---|---|" + "---|" * len(HEADS) + "---|---|---|---|---|",
    ]
    for name, r in rows.items():
        m, n = r["models"], r["n"]
        steps = r["steps"]
        lines.append(
            f"| {name}: {sets[name].what} | {'/'.join(map(str, r['windows']))} "
            f"| {'×'.join(map(str, r['image']))} "
            f"| {steps.get('steps', '?')} ({steps.get('batch_size', '?')}) | "
            + " | ".join(_pm(m[k], n) if k in m else "—" for k in MODELS)
            + f" | {r['lead'][0]:+.3f} ({r['significant']} of {n}) "
            f"| {sets[name].published or '—'} | {n} | {_seconds(r)} | {r['seconds']:.0f} |"
        )
    lines += ["", *targets(rows), "", "Commands (each once per seed, `seed=N`):", "", "```bash"]
    lines += [*dict.fromkeys(commands), "```"]
    return "\n".join(lines)


def targets(rows: dict[str, dict]) -> list[str]:
    """Issue 23's targets, each stated met or not with its figure."""
    out = []
    if "gunpoint" in rows:
        gp = rows["gunpoint"]["models"]
        ok = gp["resnet"][0] >= 0.95 and gp["resnet"][0] >= gp["svm"][0]
        out.append(
            f"- GunPoint, ResNet at least 0.95 and at least the SVM: ResNet "
            f"{gp['resnet'][0]:.3f}, SVM {gp['svm'][0]:.3f}: **{'met' if ok else 'not met'}**."
        )
    below = [
        f"{name} ({r['models']['resnet'][0]:.3f} against {r['models']['svm'][0]:.3f})"
        for name, r in rows.items()
        if "svm" in r["models"] and r["models"]["resnet"][0] < r["models"]["svm"][0]
    ]
    out.append(
        "- ResNet at least the SVM on every dataset: "
        + ("**met**." if not below else f"**not met** on {', '.join(below)}.")
    )
    return out


def run_cli(overrides: list[str], run_dir: Path, *, log) -> dict:
    """One ``python -m pipeline.run`` with ``overrides``; returns its metrics.json.

    A run folder that already holds a finished run of the same configuration (Hydra's
    .hydra/config.yaml) is read instead of run again, so an interrupted suite picks
    up where it stopped.
    """
    cmd = [sys.executable, "-m", "pipeline.run", *overrides, f"hydra.run.dir={run_dir}"]
    cmd.append("progress=false")
    log(" ".join(shlex.quote(c) for c in cmd[1:]))
    done, wall = run_dir / "metrics.json", run_dir / "wall_seconds.txt"
    if done.exists() and _same_config(run_dir, cmd[3:]):
        metrics = json.loads(done.read_text())
        if wall.exists():  # the run's own wall time, kept when it was run
            metrics["_wall_seconds"] = float(wall.read_text())
        return metrics
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = json.loads(done.read_text())
    metrics["_wall_seconds"] = time.perf_counter() - t0
    atomic.write_text(wall, f"{metrics['_wall_seconds']:.1f}\n")
    return metrics


def _same_config(run_dir: Path, overrides: list[str]) -> bool:
    """Whether ``run_dir`` was run with ``overrides``, today's configuration files and the
    precision the networks would train in here (bf16 or float32 on a CPU, by whether it
    computes bf16 natively)."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.exists():
        return False
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        now = compose("config", [o for o in overrides if not o.startswith("hydra.")])
    if OmegaConf.to_container(OmegaConf.load(saved)) != OmegaConf.to_container(now):
        return False
    used = json.loads((run_dir / "metrics.json").read_text())["run"].get("precision")
    return used == precision(resolve_device(now.device), now.train.amp)


def run_row(d: Dataset, args, runs: Path) -> tuple[list[dict], str]:
    """Row ``d``'s runs, one per seed (their metrics), and the command they ran."""
    seeds = [int(s) for s in (args.slow_seeds if d.slow else args.seeds).split(",")]
    trained = ",".join(m for m in args.models.split(",") if m not in d.skip)
    per_seed = []
    for seed in seeds:
        over = [*d.overrides, f"models=[{trained}]", *args.overrides, f"seed={seed}"]
        per_seed.append(run_cli(over, runs / f"{d.name}-s{seed}", log=lambda c: None))
    models = f"'models=[{trained}]'"
    return per_seed, " ".join(["python -m pipeline.run", *d.overrides, models, *args.overrides])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", default="runs/suite", help="folder for the run folders")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the quick datasets")
    parser.add_argument("--slow-seeds", default="0", help="seeds of the FSDD datasets")
    parser.add_argument("--only", default="", help="comma-separated dataset names")
    parser.add_argument("--fsdd", default=str(REPO.parent / "shared/datasets/fsdd/recordings"))
    parser.add_argument("--gunpoint", default=str(REPO.parent / "shared/datasets/gunpoint"))
    parser.add_argument("--models", default=",".join(MODELS), help="the models every run trains")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = parser.parse_args(argv)
    runs = Path(args.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    sets = {d.name: d for d in datasets(args, runs)}
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(sets))
    if unknown:
        parser.error(f"--only {unknown[0]!r} is not a dataset; choose from {sorted(sets)}")
    if not (runs / "traces").is_dir():
        write_traces(runs / "traces")
    fsdd = Path(args.fsdd)
    if fsdd.is_dir() and not (runs / "fsdd-tiny.csv").exists():
        write_tiny_manifest(fsdd, runs / "fsdd-tiny.csv")
    rows: dict[str, dict] = {}
    commands: list[str] = []
    machine = ""
    for name, d in sets.items():
        if only and name not in only:
            continue
        if d.needs is not None and not d.needs.exists():
            print(f"{name}: skipped, {d.needs} does not exist")
            continue
        per_seed, command = run_row(d, args, runs)
        commands.append(command)
        rows[name] = summarise(per_seed)
        machine = machine or _device_line(per_seed[0])
        print(
            name,
            {k: round(v[0], 4) for k, v in rows[name]["models"].items()},
            f"{rows[name]['seconds']:.0f} s",
            flush=True,
        )
        output = Path(args.output)
        old = output.read_text() if output.exists() else ""
        text = render(rows, sets, machine=machine, commands=commands)
        if "<!-- suite -->" not in old:  # first time: the suite goes first, above the FSDD tables
            old = "<!-- suite -->\n<!-- /suite -->\n\n" + old
        atomic.write_text(output, splice(old, "suite", text))
    print(f"wrote {args.output}")
    return 0
