"""Real-data benchmark on the Free Spoken Digit Dataset, through the public CLI.

``python -m pipeline.bench fsdd [--root ../shared/datasets/fsdd/recordings]`` runs
``python -m pipeline.run +experiment=fsdd`` exactly as a user would, on

1. the official split (takes 0-4 of every speaker are the test set);
2. leave-one-speaker-out: six folds, each speaker held out once
   (``data.split=group data.test_groups=[<speaker>]``); validation is a whole
   training speaker, never the held-out one;

then reads each run's ``metrics.json`` and writes ``BENCHMARKS.md`` (the tables,
the device, the commands and the published figures to compare with).
``--ablation "key=value ..."`` adds a ResNet-only row per setting with those
overrides, e.g. ``--ablation "train.augment.freq_mask=0 train.augment.time_mask=0"``
(repeatable).

``--tune NAME="key=value ..."`` (repeatable) is how the preset's settings were
chosen: ResNet only, for each ``--tune-pairs`` entry ``held_out:validation`` it
trains on the other speakers with ``data.val_groups=[validation]`` and reports the
validation speaker's window accuracy at the last epoch (the preset keeps the last
epoch). The held-out speaker's results are not shown, so they cannot steer the
choice; they are in each run's metrics.json. A pair and its mirror (``a:b`` and
``b:a``) train on the same speakers with the same seed, hence the same network on
a CPU (nearly so on a GPU), so they share one run with ``train.monitor=last``: its
test speaker's accuracy is the mirror's validation accuracy. ``--tune-round NAME``
gives a round its own table, kept beside the earlier rounds'.

``--adapt-bn`` also classifies each held-out speaker with the fold's saved networks
through ``task=predict predict.adapt_bn=group`` (every batch norm's statistics
re-estimated on that speaker's own files first) and reports those figures in a
second table; training is the same, so finished folds are not trained again.

``--seeds 0,1,2`` runs every setting (or tuning candidate and pair) once per seed and
reports means (and standard deviations): one seed can move a speaker's accuracy by 0.1.
"""

from __future__ import annotations

import argparse
import copy
import csv
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

from pipeline import atomic
from pipeline.metrics import holm, mcnemar_p, pairwise_mcnemar
from pipeline.runtime import cpu_bf16_units, precision, resolve_device

SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
MODELS = ("resnet", "plain_cnn", "svm")
REPO = Path(__file__).resolve().parents[2]

PUBLISHED = """\
Published figures to compare with (different splits and dataset versions, so only a guide):

| source | split | model | accuracy |
|---|---|---|---|
| this project's issue 9: log STFT 64x64, ResNet-20, 10 epochs, no augmentation \
| official | ResNet-20 | about 0.99 |
| the same | theo or lucas held out | ResNet-20 / SVM | about 0.71-0.79 / 0.31-0.38 |
| adhishthite/sound-mnist (GitHub README): FSDD of 3 speakers, random 90/10 split \
| random | MFCC + Keras CNN | 0.97 |
| FluxML/model-zoo, contrib/audio/Spoken_Digit_Recognition (README): FSDD of 4 speakers, \
2,000 recordings, random 15 % test split | random | spectrogram + 2-layer CNN (Flux) | 0.9233 |
| dilne/Free-Spoken-Digit-Dataset (README): FSDD, a validation split the README does not \
describe | random (?) | mel spectrogram images + modified ResNet-18, 160 epochs | 0.9527 |

None of them holds a speaker out: a random split puts takes of every speaker in both the
training and the test set, as the official split does.
"""


def _run(cmd: list[str]) -> None:
    """Run ``cmd`` from the repository; a failure raises with the tail of its output."""
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def run_cli(overrides: list[str], run_dir: Path, *, log) -> dict:
    """One ``python -m pipeline.run`` with ``overrides``; returns its metrics.json.

    A run folder that already holds a finished run of the same configuration (Hydra's
    .hydra/config.yaml) is read instead of run again, so an interrupted benchmark picks
    up where it stopped.
    """
    cmd = [sys.executable, "-m", "pipeline.run", *overrides, f"hydra.run.dir={run_dir}",
           "progress=false"]  # fmt: skip
    log(" ".join(shlex.quote(c) for c in cmd[1:]))
    done, wall = run_dir / "metrics.json", run_dir / "wall_seconds.txt"
    if done.exists() and _same_config(run_dir, cmd[3:]):
        metrics = json.loads(done.read_text())
        if wall.exists():  # the run's own wall time, kept when it was run
            metrics["_wall_seconds"] = float(wall.read_text())
        return metrics
    t0 = time.perf_counter()
    _run(cmd)
    metrics = json.loads(done.read_text())
    metrics["_wall_seconds"] = time.perf_counter() - t0
    atomic.write_text(wall, f"{metrics['_wall_seconds']:.1f}\n")
    return metrics


def _same_config(run_dir: Path, overrides: list[str]) -> bool:
    """Whether ``run_dir`` was run with ``overrides``, today's configuration files and, where
    its metrics.json records it, the precision the networks would train in here (bf16 or
    float32 on a CPU, by whether it computes bf16 natively). Runs from before 2026-11-26
    record none and are taken as they are."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.exists():
        return False
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        now = compose("config", [o for o in overrides if not o.startswith("hydra.")])
    if OmegaConf.to_container(OmegaConf.load(saved)) != OmegaConf.to_container(now):
        return False
    used = json.loads((run_dir / "metrics.json").read_text())["run"].get("precision")
    return used is None or used == precision(resolve_device(now.device), now.train.amp)


def adapted_files(run_dir: Path, root: Path, speaker: str, model: str, *, log) -> dict[str, bool]:
    """Whether ``run_dir``'s saved ``model`` classified each of ``speaker``'s files right
    ({file name: correct}) through ``task=predict`` with ``predict.adapt_bn=group``: the
    network's batch-norm statistics re-estimated on the held-out speaker's own (unlabelled)
    files first.

    The speaker's files are linked (not copied) into class folders under the run folder,
    which is how predict knows the true classes. A finished prediction newer than the
    bundle is read instead of run again.
    """
    folder = run_dir / "heldout"
    files = sorted(root.glob(f"*_{speaker}_*.wav"))
    for f in files:
        link = folder / f.name.split("_", 1)[0] / f.name
        if link.is_symlink() and os.readlink(link) != str(f):
            link.unlink()  # from another --root
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f)
    out = run_dir / f"adapted-{model}"
    bundle = run_dir / "models" / model
    cmd = [sys.executable, "-m", "pipeline.run", "task=predict", f"predict.model={bundle}",
           f"predict.input={folder}", "predict.adapt_bn=group", "predict.overwrite=true",
           f"hydra.run.dir={out}", "progress=false"]  # fmt: skip
    log(" ".join(shlex.quote(c) for c in cmd[1:]))
    done, stamp = out / "predictions.csv", out / "command.json"
    weights = bundle / "weights.pt"
    # Reused only when the same command (hence predict settings) ran after the bundle was saved.
    fresh = (done.exists() and stamp.exists() and json.loads(stamp.read_text()) == cmd[1:]
             and done.stat().st_mtime > weights.stat().st_mtime)  # fmt: skip
    if not fresh:
        _run(cmd)
        atomic.write_text(stamp, json.dumps(cmd[1:]))
    with open(done, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != len(files):
        raise RuntimeError(
            f"{done}: {len(rows)} of {speaker}'s {len(files)} files were classified; see "
            f"{out / 'predictions_errors.csv'}"
        )
    return {Path(r["path"]).name: r["predicted"] == r["true"] for r in rows}


def merge_seeds(runs: list[dict]) -> dict:
    """One run's metrics as they are, or several seeds' merged into one: each model's
    scores become their means over the seeds, with the standard deviations (ddof 1)
    under ``std`` and the number of runs under ``seeds``."""
    if len(runs) == 1:
        return runs[0]
    merged = copy.deepcopy(runs[0])
    for model, r in merged["models"].items():
        r["seeds"], r["std"] = len(runs), {}
        for key in ("accuracy", "macro_f1", "file_accuracy", "train_seconds"):
            values = [m["models"][model].get(key) for m in runs]
            if None not in values:
                r[key], r["std"][key] = float(np.mean(values)), float(np.std(values, ddof=1))
    return merged


def _cell(r: dict, key: str) -> str:
    """A model's score, with its standard deviation over seeds where there are several."""
    value = r.get(key, r["accuracy"])  # file_accuracy falls back to the window accuracy
    std = r.get("std", {}).get(key if key in r else "accuracy")
    return f"{value:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def seeded(seed: int | None) -> list[str]:
    """The override that sets ``seed`` (none for the configuration's own seed)."""
    return [] if seed is None else [f"seed={seed}"]


def suffix(seed: int | None) -> str:
    """The run folder's suffix for ``seed``."""
    return "" if seed is None else f"-seed{seed}"


def last_val_accuracy(metrics: dict, model: str) -> float | None:
    """Validation (window) accuracy at the last epoch of a network's learning curve."""
    curve = metrics.get("histories", {}).get(model)
    return _accuracy(curve[-1]) if curve else None


def best_val_accuracy(metrics: dict, model: str) -> float | None:
    """Validation accuracy of the kept epoch of a network (from its learning curve)."""
    curve = metrics.get("histories", {}).get(model)
    best = metrics["models"][model].get("best_epoch")
    if not curve or not best:
        return None
    return _accuracy(curve[best - 1])


def _accuracy(row: dict) -> float | None:
    """1 - the row's validation error; None for a run without validation (null or NaN)."""
    error = row.get("val_error")
    return None if error is None or error != error else 1 - error


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench fsdd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", default=str(REPO.parent / "shared/datasets/fsdd/recordings"))
    parser.add_argument("--runs", default="outputs/bench-fsdd", help="folder for the run folders")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--speakers", default=",".join(SPEAKERS), help="held-out speakers")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--no-official", action="store_true", help="skip the official split")
    parser.add_argument(
        "--seeds",
        default="",
        metavar="S,S,...",
        help="run every setting (with --tune: every candidate and pair) once per seed, in "
        "folders ending -seed<S>; the tables then give the mean (and standard deviation) over "
        "the seeds",
    )
    parser.add_argument("--ablation", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--tune",
        action="append",
        default=[],
        metavar='NAME="KEY=VALUE ..."',
        help="tune only: candidate settings scored on validation speakers",
    )
    parser.add_argument(
        "--tune-pairs",
        default="nicolas:george,george:nicolas",
        help="held_out:validation speaker pairs for --tune",
    )
    parser.add_argument(
        "--tune-round",
        default="",
        metavar="NAME",
        help="--tune writes its own section for this round, so earlier rounds' tables (whose "
        "run folders may be gone) stay in the file",
    )
    parser.add_argument(
        "--adapt-bn",
        action="store_true",
        help="also classify each held-out speaker with every fold's saved networks through "
        "task=predict predict.adapt_bn=group (batch-norm statistics re-estimated on the "
        "speaker's own files), in a second table",
    )
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args(argv)
    if args.tune_round and not re.fullmatch(r"[\w-]+", args.tune_round):
        parser.error(
            f"--tune-round={args.tune_round!r} must be letters, digits, '_' or '-' "
            "(it names a section marker in the output), e.g. 2 or 2026-11-26"
        )
    if args.seeds and not re.fullmatch(r"\d+(,\d+)*", args.seeds):
        parser.error(f"--seeds={args.seeds!r} must be whole numbers joined by commas, e.g. 0,1,2")
    root = Path(args.root).resolve()
    if not root.is_dir():
        print(f"--root={root} does not exist; point it at fsdd/recordings", file=sys.stderr)
        return 2
    runs = Path(args.runs).resolve()
    models = args.models.split(",")
    base = ["+experiment=fsdd", f"data.root={root}", f"models=[{','.join(models)}]",
            *args.overrides]  # fmt: skip
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    if args.tune:
        return tune(args, ["+experiment=fsdd", f"data.root={root}", *args.overrides], runs, seeds)
    settings = [] if args.no_official else [("official", [])]
    settings += [
        (f"loso-{s}", ["data.split=group", f"data.test_groups=[{s}]"])
        for s in args.speakers.split(",")
    ]
    commands: list[str] = []
    results: dict[str, dict] = {}
    ablations: dict[str, dict[str, dict]] = {a: {} for a in args.ablation}
    for name, extra in settings:
        per_seed = [
            run_cli([*base, *extra, *seeded(seed)], runs / f"{name}{suffix(seed)}",
                    log=commands.append)
            for seed in seeds
        ]  # fmt: skip
        results[name] = merge_seeds(per_seed)
        print(name, {m: round(results[name]["models"][m]["accuracy"], 4) for m in models})
        if args.adapt_bn and name.startswith("loso-"):
            files = {
                model: [adapted_files(runs / f"{name}{suffix(seed)}", root, name[5:], model,
                                      log=commands.append) for seed in seeds]
                for model in models if model != "svm"
            }  # fmt: skip
            results[name]["adapted"] = {
                model: float(np.mean([np.mean(list(f.values())) for f in per]))
                for model, per in files.items()
            }
            if len(seeds) == 1:  # each file once: the pooled McNemar test can count it
                results[name]["adapted_files"] = {model: per[0] for model, per in files.items()}
            print(" adapt_bn", {m: round(v, 4) for m, v in results[name]["adapted"].items()})
        for a in args.ablation:
            tag = a.replace("=", "-").replace("/", "_")
            over = [*base, *extra, "models=[resnet]", *a.split()]
            ablations[a][name] = run_cli(over, runs / f"{name}_{tag}", log=commands.append)
            print(" ", a, round(ablations[a][name]["models"]["resnet"]["accuracy"], 4))
        # Rewritten after every setting, so an interrupted benchmark keeps what it measured;
        # the notes and tuning sections of the file are kept as they are.
        output = Path(args.output)
        old = output.read_text() if output.exists() else ""
        text = render(results, ablations, models=models, commands=commands, extra=args.overrides,
                      seeds=args.seeds)  # fmt: skip
        atomic.write_text(output, keep_sections(old, text))
    print(f"wrote {args.output}")
    return 0


def tune(args, base: list[str], runs: Path, seeds: list[int | None]) -> int:
    """Score each ``--tune`` candidate on validation speakers only.

    Every candidate run in ``runs`` so far (this call's and earlier ones') goes into
    the tuning section of ``--output``; the rest of that file is kept.
    """
    pairs = [p.split(":") for p in args.tune_pairs.split(",")]
    runs_of = [(held, val, seed) for held, val in pairs for seed in seeds]
    section = f"tuning-{args.tune_round}" if args.tune_round else "tuning"
    for cand in args.tune:
        name, _, over = cand.partition("=")
        done: dict[tuple, tuple[dict, str]] = {}  # (held, val, seed) -> metrics, command
        for held, val, seed in runs_of:
            run_dir = runs / f"tune-{name}-{held}-{val}{suffix(seed)}"
            mirror = done.get((val, held, seed))
            if mirror is not None and _kept_last(mirror[0], test=val):
                # The mirror pair trains on the same speakers with the same seed: the same
                # network, step for step. With the last epoch kept, its test speaker's window
                # accuracy is this pair's validation accuracy at the last epoch.
                m, command = mirror
                score = m["models"]["resnet"]["accuracy"]
            else:
                # The last epoch is kept whatever the candidate sets, so that the test
                # speaker's accuracy can stand in for the mirror pair's validation score.
                extra = ["models=[resnet]", "data.split=group", f"data.test_groups=[{held}]",
                         f"data.val_groups=[{val}]", *over.split(), *seeded(seed),
                         "train.monitor=last"]  # fmt: skip
                commands: list[str] = []
                m = run_cli([*base, *extra], run_dir, log=commands.append)
                command = commands[0]
                done[(held, val, seed)] = m, command
                score = last_val_accuracy(m, "resnet")
            record = {"name": name, "overrides": over, "held_out": held, "validation": val,
                      "seed": seed, "val_accuracy": score,
                      "train_seconds": m["models"]["resnet"]["train_seconds"],
                      "command": command}  # fmt: skip
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(run_dir / "candidate.json", json.dumps(record, indent=1))
            print(name, held, val, seed, round(record["val_accuracy"], 4), flush=True)
            output = Path(args.output)
            old = output.read_text() if output.exists() else ""
            table = tuning_section(runs, args.tune_round)
            if section not in sections(old):  # a new round goes after the earlier ones
                old = add_section(old, section, after=_last_tuning(old, "tuning"))
            atomic.write_text(output, splice(old, section, table))
    print(f"wrote {args.output}")
    return 0


def _kept_last(metrics: dict, *, test: str) -> bool:
    """Whether a tuning run kept its last epoch and tested ``test`` alone, so that its
    test accuracy is ``test``'s validation score at the last epoch."""
    r = metrics["models"]["resnet"]
    return (metrics["dataset"]["groups"]["test"] == [test]
            and r.get("best_epoch") == len(metrics["histories"]["resnet"]))  # fmt: skip


def tuning_section(runs: Path, round_name: str = "") -> str:
    """The tuning table of every candidate run under ``runs``, in the order they ran."""
    found = sorted(runs.glob("tune-*/candidate.json"), key=lambda p: p.stat().st_mtime)
    records = [json.loads(p.read_text()) for p in found]
    pairs = list(dict.fromkeys((r["held_out"], r["validation"]) for r in records))
    by_name: dict[str, dict] = {}
    for r in records:  # several seeds of a candidate and pair: their mean
        by_name.setdefault(r["name"], {"overrides": r["overrides"], "scores": {}})
        pair = by_name[r["name"]]["scores"].setdefault((r["held_out"], r["validation"]), [])
        pair.append(r["val_accuracy"])
    seeded = any(len(v) > 1 for c in by_name.values() for v in c["scores"].values())
    title = "## Tuning on validation speakers" + (f", round {round_name}" if round_name else "")
    lines = [title, "",
             "How the preset's settings were chosen: `python -m pipeline.bench fsdd --tune "
             "NAME=\"overrides\"`. ResNet only; each run holds one speaker out and validates "
             "on another training speaker (`data.val_groups`); the table shows that validation "
             "speaker's window accuracy at the last epoch, never the held-out speaker's. A pair "
             "and its mirror (a:b and b:a) train on the same speakers, so they share one run "
             "(`train.monitor=last`): each speaker validates the other's fold"
             + (" (the mean over the seeds run, their number in brackets)." if seeded else "."),
             "",
             "| candidate | overrides | " + " | ".join(f"val {v} (held out {h})" for h, v in pairs)
             + " | mean |", "|---|---|" + "---|" * (len(pairs) + 1)]  # fmt: skip
    for name, c in by_name.items():
        scores = [c["scores"].get(p, []) for p in pairs]
        vals = [float(np.mean(v)) if v else None for v in scores]
        cells = [_f(v) + (f" ({len(n)})" if seeded and n else "")
                 for v, n in zip(vals, scores, strict=True)]  # fmt: skip
        mean = f"{np.mean(vals):.4f}" if None not in vals else "-"
        lines.append(f"| {name} | `{c['overrides'] or '(the preset)'}` | "
                     + " | ".join(cells) + f" | {mean} |")  # fmt: skip
    commands = dict.fromkeys(f"python {r['command']}" for r in records)  # mirrors share one
    lines += ["", "```bash", *commands, "```", ""]
    return "\n".join(lines)


def splice(text: str, name: str, section: str) -> str:
    """Put ``section`` between ``<!-- name -->`` and ``<!-- /name -->`` in ``text``
    (replacing what was there, or appending)."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"


def sections(text: str) -> list[str]:
    """Names of the ``<!-- name -->`` ... ``<!-- /name -->`` sections in ``text``, in order."""
    return [n for n in re.findall(r"<!-- ([\w-]+) -->", text) if f"<!-- /{n} -->" in text]


def keep_sections(old: str, new: str) -> str:
    """``new`` with the notes, every tuning round and the development suite of ``old``
    carried over: written by hand, by ``--tune`` or by ``bench suite``, they are not
    regenerated by this benchmark run."""
    for name in sections(old):
        if name == "notes" or name.startswith(("tuning", "suite")):
            if name not in sections(new):  # a later tuning round: after the one before it
                after = "suite" if name.startswith("suite") else _last_tuning(new, "notes")
                new = add_section(new, name, after=after)
            if kept(old, name):
                new = splice(new, name, kept(old, name))
    return new


def add_section(text: str, name: str, *, after: str) -> str:
    """``text`` with an empty ``name`` section right after the section ``after``."""
    end = f"<!-- /{after} -->"
    return text.replace(end, f"{end}\n\n<!-- {name} -->\n<!-- /{name} -->", 1)


def _last_tuning(text: str, default: str) -> str:
    """The last tuning round's section name in ``text``, or ``default``."""
    return ([n for n in sections(text) if n.startswith("tuning")] or [default])[-1]


def kept(text: str, name: str) -> str:
    """The text between ``<!-- name -->`` and ``<!-- /name -->`` (stripped), or ''."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if begin in text and end in text:
        return text.split(begin, 1)[1].split(end, 1)[0].strip()
    return ""


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


def render(results, ablations, *, models, commands, extra, seeds: str = "") -> str:
    first = next(iter(results.values()))
    lines = [
        "<!-- suite -->",  # python -m pipeline.bench suite writes here; kept on a rewrite
        "<!-- /suite -->",
        "",
        "# Benchmarks: Free Spoken Digit Dataset",
        "",
        "Generated by `python -m pipeline.bench fsdd"
        + (" " + " ".join(extra) if extra else "")
        + f"` on {time.strftime('%Y-%m-%d')}. Machine: {_device_line(first)}.",
        "Every run goes through the public CLI with the `+experiment=fsdd` preset "
        "(conf/experiment/fsdd.yaml); the exact commands are at the end."
        + (
            f" Every setting ran once per seed ({seeds.replace(',', ', ')}): each score is "
            "the mean ± standard deviation over those runs."
            if seeds
            else ""
        ),
        "",
        *status(results, models),
        "<!-- notes -->",  # hand-written notes go here; kept when the file is rewritten
        "<!-- /notes -->",
        "",
    ]
    if "official" in results:
        m = results["official"]
        lines += ["## Official split (takes 0-4 of every speaker are the test set, 300 files)", "",
                  "| model | accuracy | macro-F1 | file accuracy | train s |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for model in models:
            r = m["models"][model]
            lines.append(
                f"| {model} | {_cell(r, 'accuracy')} | {_cell(r, 'macro_f1')} | "
                f"{_cell(r, 'file_accuracy')} | {r['train_seconds']:.0f} |"
            )
        lines.append("")
    folds = {k: v for k, v in results.items() if k.startswith("loso-")}
    if folds:
        vals = {k: best_val_accuracy(m, "resnet") if "resnet" in models else None
                for k, m in folds.items()}  # fmt: skip
        val_head = " ResNet val. acc. |" if any(v is not None for v in vals.values()) else ""
        lines += ["## Leave one speaker out (train on five speakers, test on the sixth)", "",
                  "File-level accuracy (a file's windows scored by their mean probability). "
                  + _validation_sentence(next(iter(folds.values()))), "",
                  "| held-out speaker | " + " | ".join(models) + " |" + val_head,
                  "|---|" + "---|" * len(models) + "---|" * bool(val_head)]  # fmt: skip
        table = {model: [] for model in models}
        for name, m in folds.items():
            row = []
            for model in models:
                r = m["models"][model]
                table[model].append(r.get("file_accuracy", r["accuracy"]))
                row.append(_cell(r, "file_accuracy"))
            val = f" {_f(vals[name])} |" if val_head else ""
            lines.append(f"| {name[5:]} | " + " | ".join(row) + " |" + val)
        pad = " |" if val_head else ""
        lines.append(
            "| **mean** | "
            + " | ".join(f"**{np.mean(v):.4f}**" for v in table.values())
            + " |"
            + pad
        )
        f1 = {model: np.mean([m["models"][model]["macro_f1"] for m in folds.values()])
              for model in models}  # fmt: skip
        secs = {model: np.mean([m["models"][model]["train_seconds"] for m in folds.values()])
                for model in models}  # fmt: skip
        lines.append("| mean macro-F1 (windows) | " + " | ".join(f"{v:.4f}" for v in f1.values())
                     + " |" + pad)  # fmt: skip
        lines.append(
            "| mean train s | " + " | ".join(f"{v:.0f}" for v in secs.values()) + " |" + pad
        )
        lines.append("")
        lines += adapted_table(folds, models)
        lines += pooled_significance(folds)
    for a, per in ablations.items():
        if not per:
            continue
        lines += [f"### Ablation: ResNet with `{a}`", "",
                  "| setting | test accuracy | ResNet val. acc. | preset's test accuracy |",
                  "|---|---|---|---|"]  # fmt: skip
        for name, m in per.items():
            r = m["models"]["resnet"]
            base = results[name]["models"]["resnet"]
            lines.append(
                f"| {name} | {r.get('file_accuracy', r['accuracy']):.4f} | "
                f"{_f(best_val_accuracy(m, 'resnet'))} | "
                f"{base.get('file_accuracy', base['accuracy']):.4f} |"
            )
        lines.append("")
    lines += ["<!-- tuning -->", "<!-- /tuning -->", "", PUBLISHED, "## Commands", "", "```bash"]
    lines += [f"python {c}" for c in commands]
    lines += ["```", ""]
    return "\n".join(lines)


def adapted_table(folds: dict[str, dict], models: list[str]) -> list[str]:
    """The held-out speakers classified with ``predict.adapt_bn=group``, where measured."""
    if not all("adapted" in m for m in folds.values()):
        return []
    lines = ["### The same models with test-time batch-norm adaptation", "",
             "Each fold's saved networks classify the held-out speaker through `task=predict "
             "predict.adapt_bn=group`: first every batch norm's statistics are re-estimated on "
             "that speaker's own files (no labels; AdaBN, Li et al. 2016), then the files are "
             "classified. Training is unchanged; the SVM has no batch norm and keeps its "
             "figures. File accuracy:", "",
             "| held-out speaker | " + " | ".join(models) + " |",
             "|---|" + "---|" * len(models)]  # fmt: skip
    table = {model: [] for model in models}
    for name, m in folds.items():
        row = []
        for model in models:
            r = m["models"][model]
            v = m["adapted"].get(model, r.get("file_accuracy", r["accuracy"]))
            table[model].append(v)
            row.append(f"{v:.4f}")
        lines.append(f"| {name[5:]} | " + " | ".join(row) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{np.mean(v):.4f}**" for v in table.values())
                 + " |")  # fmt: skip
    return [*lines, ""]


def pooled_significance(folds: dict[str, dict]) -> list[str]:
    """McNemar's exact test of every pair of models over all the folds' held-out files.

    Each file is tested once, by the fold that held its speaker out, so the discordant
    counts of the folds' own tests (metrics.json ``significance``, file level) add up to
    those of one test on every file. With test-time adaptation, the networks' files as
    ``predict.adapt_bn=group`` classified them, paired by file name. A pair is left out
    unless every fold tested it; runs merged over seeds (each file tested once per seed)
    get no table.
    """
    if any("seeds" in r for m in folds.values() for r in m["models"].values()):
        return []
    tested = [{(t["a"], t["b"]): t for t in m.get("significance", []) if t.get("unit") == "files"}
              for m in folds.values()]  # fmt: skip
    rows = []
    for a, b in tested[0] if tested else []:
        if all((a, b) in fold for fold in tested):
            rows.append((a, b, "", *(sum(fold[a, b][k] for fold in tested)
                                     for k in ("n", "a_only", "b_only"))))  # fmt: skip
    if all("adapted_files" in m for m in folds.values()):
        per_fold = [m["adapted_files"] for m in folds.values()]
        files = [(f, sorted(next(iter(f.values())))) for f in per_fold]  # one order per fold
        correct = {net: np.array([f[net][name] for f, names in files for name in names])
                   for net in per_fold[0]}  # fmt: skip
        # Each network's "prediction" is whether it was right, so every file's truth is True.
        for t in pairwise_mcnemar(np.ones(len(next(iter(correct.values()))), bool), correct):
            rows.append((t["a"], t["b"], " adapted", t["n"], t["a_only"], t["b_only"]))
    if not rows:
        return []
    adjusted = holm([mcnemar_p(a_only, b_only) for *_, a_only, b_only in rows])
    lines = ["### McNemar's test over all held-out files", "",
             f"Every file of the {len(folds)} held-out speakers, classified by the fold that "
             "held its speaker out. A file one model got right and the other wrong is a "
             "discordant pair; under equal error rates each is a fair coin (exact two-sided "
             "binomial test; p Holm-adjusted over the rows). It compares these trained "
             "networks, one seed each: it does not measure how much another training run "
             "would move them.", "",
             "| models | files | only the first right | only the second right | p (Holm) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for (a, b, tag, n, a_only, b_only), p in zip(rows, adjusted, strict=True):
        lines.append(f"| {a} vs {b}{tag} | {n} | {a_only} | {b_only} | {p:.3g} |")
    return [*lines, ""]


def status(results: dict, models: list[str]) -> list[str]:
    """The issue's targets, met or not, from the measured figures."""
    lines = ["## Targets", ""]
    official = results.get("official", {}).get("models", {})
    if "resnet" in official:
        acc = official["resnet"]["accuracy"]
        lines.append(f"- Official split, ResNet accuracy >= 0.99: {acc:.4f} (window), "
                     f"{official['resnet'].get('file_accuracy', acc):.4f} (file): "
                     + ("**met**" if acc >= 0.99 else "**not met**") + ".")  # fmt: skip
    folds = [m for k, m in results.items() if k.startswith("loso-")]
    if folds and "resnet" in models:
        mean = {mo: np.mean([m["models"][mo].get("file_accuracy", m["models"][mo]["accuracy"])
                             for m in folds]) for mo in models}  # fmt: skip
        others = [mo for mo in models if mo != "resnet"]
        above = all(mean["resnet"] > mean[mo] for mo in others)
        n = len(folds)
        scope = "six speakers" if n == len(SPEAKERS) else f"only {n} of six speakers so far"
        lines.append(
            f"- Leave one speaker out ({scope}), ResNet mean >= 0.90 and above "
            + " and ".join(others) + ": ResNet " + f"{mean['resnet']:.4f}, "
            + ", ".join(f"{mo} {mean[mo]:.4f}" for mo in others) + ": "
            + ("**met**" if mean["resnet"] >= 0.90 and above and n == len(SPEAKERS)
               else "**not met**" if n == len(SPEAKERS) else "incomplete") + "."
        )  # fmt: skip
        if all("adapted" in m for m in folds):
            adapted = {mo: np.mean([m["adapted"].get(mo, m["models"][mo].get(
                           "file_accuracy", m["models"][mo]["accuracy"])) for m in folds])
                       for mo in models}  # fmt: skip
            above = all(adapted["resnet"] > adapted[mo] for mo in others)
            lines.append(
                "- The same with test-time batch-norm adaptation (`predict.adapt_bn=group`): "
                + f"ResNet {adapted['resnet']:.4f}, "
                + ", ".join(f"{mo} {adapted[mo]:.4f}" for mo in others) + ": "
                + ("**met**" if adapted["resnet"] >= 0.90 and above and n == len(SPEAKERS)
                   else "**not met**" if n == len(SPEAKERS) else "incomplete") + "."
            )  # fmt: skip
    return [*lines, ""] if len(lines) > 2 else []


def _validation_sentence(metrics: dict) -> str:
    if metrics["dataset"].get("n_val"):
        return "Validation is one of the five training speakers; each network keeps its best epoch."
    return ("No validation speaker: every model trains on all five training speakers and the "
            "networks keep their last epoch; the settings were chosen beforehand on validation "
            "speakers (see the tuning section).")  # fmt: skip


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"
