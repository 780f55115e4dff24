"""Aggregate the runs of a sweep: ``summary.json``, ``summary.md`` and ``summary.html``.

A Hydra multirun (``python -m pipeline.run -m seed=0,1,2 resnet.depth=20,56``)
leaves one run folder per job under the sweep folder, each with its
``metrics.json`` and ``.hydra/overrides.yaml``. Runs whose overrides differ only
in ``seed`` form one *setting*; per setting and model the summary gives the mean
and sample standard deviation (n - 1) of every headline figure over the runs,
and links each run's own report. Like :mod:`pipeline.report`, it reads only
saved files, so it can be rendered again at any time.

A search (``-m hparams_search=resnet``: the runs' configuration names an
``optimized_metric``) is summarised by that validation figure instead: every
trial's objective, and the best trial with its test figures, the only test
figures the summary shows (choosing among the trials by a test figure would
tune on the test split).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from pipeline import atomic, calibration, degradation, report
from pipeline.errors import ConfigError
from pipeline.report import HEADLINE, data_uri, html_code, md_code, templates

plt = report.plt  # pyplot with the Agg backend, chosen in pipeline.report

SEED = "seed"
# The figures an optimized_metric may name: each model's, on the validation split only.
OBJECTIVES = ("val_accuracy",)


def parse_metric(metric: str) -> tuple[str, str]:
    """``optimized_metric`` as (model, figure), e.g. ``resnet/val_accuracy``.

    Raises:
        ConfigError: not ``<model>/<figure>``, or a figure other than a validation one.
    """
    model, _, key = str(metric).partition("/")
    if not model or key not in OBJECTIVES:
        raise ConfigError(
            f"optimized_metric={metric} must be <model>/{' or '.join(OBJECTIVES)}, e.g. "
            "resnet/val_accuracy: a search tunes on the validation split, never on the test split"
        )
    return model, key


def objective(metrics: dict, metric: str) -> float | None:
    """The figure ``metric`` (:func:`parse_metric`) names in a run's ``metrics``; None when
    the run has none (no validation windows, or the model was not trained)."""
    model, key = parse_metric(metric)
    value = metrics.get("models", {}).get(model, {}).get(key)
    return None if value is None else float(value)


def find_runs(sweep_dir: Path) -> list[Path]:
    """Run folders below ``sweep_dir`` holding a ``metrics.json``, in job order (2 before 10)."""
    runs = [p.parent for p in Path(sweep_dir).rglob("metrics.json") if p.parent != sweep_dir]

    def natural(path: Path) -> list:
        rel = path.relative_to(sweep_dir).as_posix()
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", rel)]

    return sorted(runs, key=natural)


def read_overrides(run_dir: Path) -> list[str]:
    """The job's command-line overrides from ``.hydra/overrides.yaml`` ([] if absent)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def summarise(sweep_dir: Path) -> dict | None:
    """The contents of ``summary.json`` for the runs under ``sweep_dir``; None if there are none.

    Returns:
        ``{"sweep_dir", "n_runs", "common_overrides", "setting_keys", "split_follows_seed",
        "runs": [...], "settings": [...]}``; each setting holds ``models`` (per model and
        headline key: mean, std, n, values) and ``significance`` (per pair of models:
        the accuracy difference over runs and how often McNemar's test found one better).
    """
    sweep_dir = Path(sweep_dir)
    runs = read_runs(sweep_dir)
    if not runs:
        return None
    keys = list(dict.fromkeys(k for r in runs for k in r["overrides"]))
    varying = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1]
    setting_keys = [k for k in varying if k != SEED]
    common = [f"{k}={runs[0]['overrides'][k]}" for k in keys if k not in varying]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        r["setting"] = " ".join(f"{k}={r['overrides'].get(k)}" for k in setting_keys)
        groups.setdefault(tuple(r["overrides"].get(k) for k in setting_keys), []).append(r)
    split_seeds = [(r["seed"], r["split_seed"]) for r in runs]
    found = search(sweep_dir, runs)
    if found is not None:
        return _search_summary(sweep_dir, runs, found, common, setting_keys)
    return {
        "sweep_dir": str(sweep_dir),
        "n_runs": len(runs),
        "common_overrides": common,
        "setting_keys": setting_keys,
        "split_follows_seed": all(s is not None and s == t for s, t in split_seeds),
        "runs": [
            {
                "dir": r["dir"],
                "setting": r["setting"],
                "seed": r["seed"],
                "overrides": [f"{k}={v}" for k, v in r["overrides"].items()],
                "reports": r["reports"],
                "accuracy": {n: m["accuracy"] for n, m in r["metrics"]["models"].items()},
            }
            for r in runs
        ],
        "settings": [_setting(group) for group in groups.values()],
        "degradation": degradation.degradation(runs),
    }


def read_runs(sweep_dir: Path) -> list[dict]:
    """Every run below ``sweep_dir`` with models in its ``metrics.json``: its folder (relative),
    overrides, seeds, reports and metrics."""
    runs = []
    for run_dir in find_runs(sweep_dir):
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        if not metrics.get("models"):
            continue
        rel = run_dir.relative_to(sweep_dir).as_posix()
        config = metrics.get("run", {}).get("config") or {}
        runs.append(
            {
                "dir": rel,
                "overrides": dict(_split(o) for o in read_overrides(run_dir)),
                "seed": metrics.get("run", {}).get("seed"),
                "split_seed": config.get("data", {}).get("split_seed"),
                "optimized_metric": config.get("optimized_metric"),
                "reports": [
                    f"{rel}/{n}" for n in ("report.html", "report.md") if (run_dir / n).is_file()
                ],
                "metrics": metrics,
            }
        )
    return runs


def search(sweep_dir: Path, runs: list[dict]) -> dict | None:
    """The search section of ``summary.json`` when the runs are the trials of a search (their
    configuration names one ``optimized_metric``); None otherwise.

    The best trial is the one whose objective, the validation figure each trial returned to
    the sweeper (recomputed from its ``metrics.json``), is highest (``direction: maximize``,
    Hydra's Optuna sweeper's setting) or lowest; of equal ones, the first, as Optuna's.

    Returns:
        ``{"optimized_metric", "direction", "trials": [{"dir", "setting", "objective"}],
        "best": {"dir", "setting", "overrides", "objective", "reports", "models"}, "optuna"}``:
        ``best.models`` holds the best trial's test figures, ``optuna`` the sweeper's
        ``optimization_results.yaml`` (None without it) with ``agrees``: whether its best
        parameters are the best trial's; ``best`` is None when no trial has an objective.
    """
    metrics = {r["optimized_metric"] for r in runs}
    if len(metrics) != 1 or None in metrics:
        return None
    (metric,) = metrics
    direction = _direction(Path(sweep_dir) / runs[0]["dir"])
    trials = [
        {"dir": r["dir"], "setting": r["setting"], "objective": objective(r["metrics"], metric)}
        for r in runs
    ]
    scored = [(t, r) for t, r in zip(trials, runs, strict=True) if t["objective"] is not None]
    sign = -1.0 if direction == "minimize" else 1.0
    best = None
    if scored:
        t, r = max(scored, key=lambda tr: sign * tr[0]["objective"])
        overrides = [f"{k}={v}" for k, v in r["overrides"].items()]
        best = {**t, "overrides": overrides, "reports": r["reports"]}
        best["models"] = r["metrics"]["models"]
    results = Path(sweep_dir) / "optimization_results.yaml"
    optuna = OmegaConf.to_container(OmegaConf.load(results)) if results.is_file() else None
    if best is not None and optuna is not None and "best_params" in optuna:
        chosen = [f"{k}={v}" for k, v in optuna["best_params"].items()]
        optuna["agrees"] = set(chosen) <= set(best["overrides"])
    return {
        "optimized_metric": metric,
        "direction": direction,
        "trials": trials,
        "best": best,
        "optuna": optuna,
    }


def _direction(run_dir: Path) -> str:
    """The sweeper's ``direction`` in the run's ``.hydra/hydra.yaml`` (maximize without one)."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return "maximize"
    direction = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.direction")
    return str(direction) if direction in ("maximize", "minimize") else "maximize"


def _search_summary(
    sweep_dir: Path, runs: list[dict], found: dict, common: list[str], setting_keys: list[str]
) -> dict:
    """``summary.json`` of a search: the trials by their objective, and the test figures of
    the best trial only."""
    return {
        "sweep_dir": str(sweep_dir),
        "n_runs": len(runs),
        "common_overrides": common,
        "setting_keys": setting_keys,
        "search": found,
        "runs": [
            {
                "dir": r["dir"],
                "setting": r["setting"],
                "seed": r["seed"],
                "overrides": [f"{k}={v}" for k, v in r["overrides"].items()],
                "reports": r["reports"],
                "objective": t["objective"],
            }
            for r, t in zip(runs, found["trials"], strict=True)
        ],
        "settings": [],
    }


def _setting(runs: list[dict]) -> dict:
    """Mean ± std per model and headline key, and the pairwise comparisons, over ``runs``."""
    names = list(dict.fromkeys(n for r in runs for n in r["metrics"]["models"]))
    models = {}
    for name in names:
        per = [r["metrics"]["models"][name] for r in runs if name in r["metrics"]["models"]]
        models[name] = {
            key: report.spread([m[key] for m in per]) for key, *_ in HEADLINE if key in per[0]
        }
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = [r for r in runs if {a, b} <= set(r["metrics"]["models"])]
            diff = [
                r["metrics"]["models"][a]["accuracy"] - r["metrics"]["models"][b]["accuracy"]
                for r in both
            ]
            tests = [
                s
                for r in both
                for s in r["metrics"].get("significance", [])
                if {s["a"], s["b"]} == {a, b}
            ]
            a_better = sum(s["p_holm"] < 0.05 and _wins(s, a) for s in tests)
            b_better = sum(s["p_holm"] < 0.05 and _wins(s, b) for s in tests)
            pairs.append(
                {
                    "a": a,
                    "b": b,
                    "accuracy_difference": report.spread(diff),
                    "n_tested": len(tests),
                    "a_better": a_better,
                    "b_better": b_better,
                    "p_values": [s["p_value"] for s in tests],
                }
            )
    return {
        "setting": runs[0]["setting"],
        "n_runs": len(runs),
        "runs": [r["dir"] for r in runs],
        "seeds": [r["seed"] for r in runs],
        "models": models,
        "significance": pairs,
        "calibration": calibration.sweep_stats(runs, names, stats=report.spread),  # ECE, AUC, T
    }


def _wins(s: dict, name: str) -> bool:
    """Whether ``name`` is the model of McNemar pair ``s`` that was right more often."""
    mine, theirs = (s["a_only"], s["b_only"]) if s["a"] == name else (s["b_only"], s["a_only"])
    return mine > theirs


def table(setting: dict) -> tuple[list[str], list[dict]]:
    """Headline columns and rows of one setting as ``mean ± std``, the best mean flagged."""
    return report.headline_table(setting["models"], value=lambda s: s["mean"], text=_mean_std)


def _mean_std(s: dict, fmt: str) -> str:
    fmt = "{:,.0f}" if fmt == "{:,}" else fmt  # a mean count need not be whole
    if s["std"] is None:  # one run has no spread to show
        return fmt.format(s["mean"])
    return fmt.format(s["mean"]) + " ± " + fmt.format(s["std"])


def plot_accuracy(summary: dict):
    """Test accuracy per setting and model: mean ± std as bars, each run as a dot."""
    settings = summary["settings"]
    names = list(dict.fromkeys(n for s in settings for n in s["models"]))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 1.6 * len(settings) * len(names) / 3), 3.6))
    for j, name in enumerate(names):
        for i, s in enumerate(settings):
            if name not in s["models"]:
                continue
            acc = s["models"][name]["accuracy"]
            x = i + (j - (len(names) - 1) / 2) * width
            ax.bar(
                x,
                100 * acc["mean"],
                width * 0.9,
                yerr=100 * (acc["std"] or 0),
                capsize=3,
                color=f"C{j}",
                alpha=0.75,
                label=name if i == 0 else None,
            )
            ax.plot([x] * acc["n"], [100 * v for v in acc["values"]], "o", color="black", ms=3)
    ax.set_xticks(range(len(settings)), [s["setting"] or "all runs" for s in settings])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 102)  # room for the dots of runs at 100 %
    ax.set_title("Test accuracy: mean ± std over runs (dots: single runs)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    return fig


def plot_objective(summary: dict):
    """A search's objective per trial in run order, the best so far as a line, the best ringed."""
    found = summary["search"]
    values = [t["objective"] for t in found["trials"]]
    x = [i for i, v in enumerate(values) if v is not None]
    y = [v for v in values if v is not None]
    pick = np.minimum if found["direction"] == "minimize" else np.maximum
    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(values) + 2), 3.4))
    ax.plot(x, y, "o", color="C0", ms=5, label="trial")
    if y:
        ax.step(x, pick.accumulate(np.asarray(y)), where="post", color="C1", label="best so far")
        best = [t["dir"] for t in found["trials"]].index(found["best"]["dir"])
        ax.plot([best], [values[best]], "o", ms=12, mfc="none", color="C3", label="best trial")
    ax.set_xlabel("trial (run order)")
    ax.set_ylabel(found["optimized_metric"])
    ax.set_title(f"Search: {found['optimized_metric']} on the validation split", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    return fig


def write_summary(sweep_dir: Path) -> Path | None:
    """Write ``summary.json``, ``summary.md`` and ``summary.html`` into ``sweep_dir``.

    A search's pages (``summary.search.*.j2``) give the trials' objectives and the best
    trial's test figures; any other sweep's (``summary.*.j2``), the mean ± std per setting.

    Returns:
        The path of ``summary.md``, or None when no run under ``sweep_dir`` holds metrics.
    """
    sweep_dir = Path(sweep_dir)
    summary = summarise(sweep_dir)
    if summary is None:
        return None
    atomic.write_json(sweep_dir / "summary.json", summary)
    found = summary.get("search")
    figure = sweep_dir / "figures" / ("summary_objective.png" if found else "summary_accuracy.png")
    figure.parent.mkdir(exist_ok=True)
    report.save_figure(plot_objective(summary) if found else plot_accuracy(summary), figure)
    best = found and found["best"]
    context = {
        "s": summary,
        "tables": [table(setting) for setting in summary["settings"]],
        "best_table": report.headline_rows(best) if best else None,
        "figure": figure.relative_to(sweep_dir).as_posix(),
        "pct": degradation.pct,
    }
    images = {"image": data_uri(figure)}
    if summary.get("degradation"):
        curves = report.save_figure(
            degradation.plot(summary["degradation"]), sweep_dir / "figures" / "degradation.png"
        )
        context["degradation_figure"] = curves.relative_to(sweep_dir).as_posix()
        images["degradation_image"] = data_uri(curves)
    name = "summary.search" if found else "summary"
    md = templates(html=False).get_template(f"{name}.md.j2").render(**context, code=md_code)
    page = templates(html=True).get_template(f"{name}.html.j2")
    html = page.render(**context, code=html_code, **images)
    atomic.write_text(sweep_dir / "summary.html", html)
    return atomic.write_text(sweep_dir / "summary.md", md)
