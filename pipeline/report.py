"""Render a run's outputs for people: figures, report.md, report.html and the printed summary.

Everything here reads only ``metrics.json``-shaped data (and, for the example
spectrograms, the images passed in), so a report can be rendered again from a
finished run without retraining.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import jinja2
import markupsafe
import matplotlib

matplotlib.use("Agg")  # no display: figures go to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pipeline import atomic, reliability  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"
PROJECT_ROOT = Path(__file__).resolve().parents[1]

# (key in metrics, column title, format, higher is better)
HEADLINE = [
    ("accuracy", "accuracy", "{:.4f}", True),
    ("adapted_accuracy", "adapted acc.", "{:.4f}", True),
    ("balanced_accuracy", "balanced acc.", "{:.4f}", True),
    ("macro_f1", "macro-F1", "{:.4f}", True),
    ("file_accuracy", "file acc.", "{:.4f}", True),
    ("adapted_file_accuracy", "adapted file acc.", "{:.4f}", True),
    ("n_params", "parameters", "{:,}", None),
    ("train_seconds", "train s", "{:.1f}", False),
    ("inference_images_per_second", "inference img/s", "{:,.0f}", True),
]


def git_commit() -> str | None:
    """The project's git commit (with ``-dirty`` when the tree has changes), or None."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def headline_columns(models: dict) -> list[tuple]:
    """The :data:`HEADLINE` columns that at least one model has."""
    return [c for c in HEADLINE if any(c[0] in m for m in models.values())]


def best_values(columns: list[tuple], models: dict, value) -> dict:
    """The best ``value(cell)`` per ranked column, when two models or more have it."""
    best = {}
    for key, _, _, higher in columns:
        values = [value(m[key]) for m in models.values() if key in m]
        if higher is not None and len(values) > 1:
            best[key] = max(values) if higher else min(values)
    return best


def headline_rows(metrics: dict) -> tuple[list[str], list[dict]]:
    """Column titles and rows of the headline table, the best value per column flagged.

    Returns:
        ``(header, rows)``: each row is ``{"model": name, "cells": [{"text", "best"}, ...]}``
        with the numbers formatted once, so Markdown, HTML and the terminal show the same text.
    """
    return headline_table(metrics["models"], value=lambda v: v, text=lambda v, fmt: fmt.format(v))


def headline_table(models: dict, *, value, text) -> tuple[list[str], list[dict]]:
    """Header and rows of a headline table, the best ``value(cell)`` per ranked column flagged.

    Args:
        models: per model, the :data:`HEADLINE` keys it has.
        value: the number a cell is ranked by.
        text: the cell's text from its value and the column's format.
    """
    columns = headline_columns(models)
    best = best_values(columns, models, value)
    rows = []
    for name, m in models.items():
        cells = []
        for key, _, fmt, _ in columns:
            if key not in m:
                cells.append({"text": "–", "best": False})
                continue
            is_best = key in best and value(m[key]) == best[key]
            cells.append({"text": text(m[key], fmt), "best": is_best})
        rows.append({"model": name, "cells": cells})
    return ["model", *(c[1] for c in columns)], rows


def significance_rows(metrics: dict, *, alpha: float = 0.05) -> list[dict]:
    """The McNemar pairs of ``metrics["significance"]`` with formatted p-values and a verdict."""
    rows = []
    for s in metrics.get("significance", []):
        if s["p_holm"] >= alpha:
            verdict = "no significant difference"
        else:
            winner, loser = (s["a"], s["b"]) if s["a_only"] > s["b_only"] else (s["b"], s["a"])
            verdict = f"{winner} better than {loser}"
        rows.append(
            {**s, "p": format_p(s["p_value"]), "holm": format_p(s["p_holm"]), "verdict": verdict}
        )
    return rows


def format_p(p: float) -> str:
    """A p-value with three significant digits (``1.23e-05`` below 0.001)."""
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.2e}"


def summary_table(metrics: dict) -> str:
    """A compact plain-text table for the terminal."""
    header, rows = headline_rows(metrics)
    rows = [[r["model"], *(c["text"] for c in r["cells"])] for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def write_figures(
    run_dir: Path, metrics: dict, *, examples: np.ndarray | None = None
) -> dict[str, str]:
    """Write the report's figures into ``run_dir/figures``; returns {name: relative path}."""
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    if metrics.get("histories"):
        written["learning_curves"] = save_figure(
            plot_learning_curves(metrics["histories"]), fig_dir / "learning_curves.png"
        )
    for name, m in metrics["models"].items():
        fig = plot_confusion(np.asarray(m["confusion"]), metrics["dataset"]["classes"], title=name)
        written[f"confusion_{name}"] = save_figure(fig, fig_dir / f"confusion_{name}.png")
    if (fig := reliability.plot(metrics)) is not None:  # None in runs before calibration
        written["reliability"] = save_figure(fig, fig_dir / "reliability.png")
    if examples is not None:
        fig = plot_examples(examples, metrics)
        written["examples"] = save_figure(fig, fig_dir / "examples.png")
    return {k: str(Path(v).relative_to(run_dir)) for k, v in written.items()}


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as a PNG at ``path`` atomically and close it."""
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1; None for one value), n and the values, of
    figures over runs: what sweep summaries show as ``mean ± std``."""
    a = np.asarray(values, dtype=float)
    std = float(a.std(ddof=1)) if a.size > 1 else None
    return {"mean": float(a.mean()), "std": std, "n": int(a.size), "values": a.tolist()}


def format_number(value: float | None, fmt: str) -> str:
    """``fmt % value``, or "-" for a missing value (None or NaN: no validation set)."""
    return "-" if value is None or value != value else fmt % value


def plot_learning_curves(histories: dict[str, list[dict]]):
    """Training (dashed) and validation (solid) error against epoch, one colour per network."""
    fig, ax = plt.subplots(figsize=(7.6, 4))
    for i, (name, history) in enumerate(histories.items()):
        epochs = [h["epoch"] for h in history]
        color = f"C{i}"
        ax.plot(
            epochs,
            [100 * h["train_error"] for h in history],
            "--",
            color=color,
            label=f"{name} train",
        )
        val = [np.nan if h["val_error"] is None else 100 * h["val_error"] for h in history]
        if np.isfinite(val).any():  # a run without validation has no validation curve
            ax.plot(epochs, val, "-", color=color, lw=2, label=f"{name} val")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("error (%)")
    ax.set_title("Learning curves (dashed: training, bold: validation)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # off the curves
    return fig


def plot_confusion(confusion: np.ndarray, classes: list[str], *, title: str):
    """Row-normalised confusion matrix with counts in each cell."""
    totals = confusion.sum(axis=1, keepdims=True)
    normalised = confusion / np.maximum(totals, 1)
    size = 1.2 + 0.55 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(normalised, vmin=0, vmax=1, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if confusion[i, j]:
                color = "white" if normalised[i, j] > 0.5 else "black"
                ax.text(
                    j,
                    i,
                    f"{normalised[i, j]:.2f}\n({confusion[i, j]})",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=color,
                )
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: confusion (row-normalised, counts)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def plot_examples(images: np.ndarray, metrics: dict):
    """One image per class (first channel) with axes in seconds and Hz, or mel bands.

    The panels share one colour scale, so classes compare at a glance; the grid
    grows to about square (1 class: one panel, 40 classes: 7 x 6).
    """
    classes = metrics["dataset"]["classes"]
    f = metrics["features"]
    unit = "dB" if f["scale"] == "db" else f["scale"]
    extent, ylabel = _image_extent(metrics)
    n = len(images)
    cols = min(n, max(4, int(np.ceil(np.sqrt(n)))))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(2.6 * cols + 0.8, 2.1 * rows + 0.6),
        squeeze=False,
        sharex=True,
        sharey=True,
        layout="constrained",
    )
    first = images[:, 0]
    vmin, vmax = float(first.min()), float(first.max())
    for ax in axes.flat[n:]:
        ax.axis("off")
    im = None
    for i, (ax, image, name) in enumerate(zip(axes.flat, first, classes, strict=False)):
        im = ax.imshow(
            image,
            origin="lower",
            aspect="auto",
            extent=extent,
            cmap="magma",
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
        )
        ax.set_title(name if len(name) <= 24 else name[:23] + "…", fontsize=8)
        ax.tick_params(labelsize=6)
        if i % cols == 0:
            ax.set_ylabel(ylabel, fontsize=7)
        if i + cols >= n:  # the lowest panel of its column
            ax.set_xlabel("time (s)", fontsize=7)
            ax.xaxis.set_tick_params(labelbottom=True)
    fig.colorbar(im, ax=axes, shrink=min(1.0, 0.3 + 0.15 * rows), pad=0.01).set_label(unit)
    fig.suptitle("One training image per class (first channel)", fontsize=10)
    return fig


def _image_extent(metrics: dict) -> tuple[tuple[float, float, float, float], str]:
    """An image's (left, right, bottom, top) in seconds and Hz (or mel bands), and its y label."""
    rate = metrics["dataset"]["sample_rate"]
    seconds = metrics["dataset"]["segment_samples"] / rate
    f = metrics["features"]
    f_min = f.get("f_min") or 0.0
    f_max = f.get("f_max") or rate / 2
    if f.get("n_mels"):
        return (0, seconds, 0, f["n_mels"]), f"mel band ({f_min:g}-{f_max:g} Hz)"
    hz_per_bin = rate / f["n_fft"]
    # the first and last FFT bins the crop keeps, as in STFTParams.bins
    lo = np.ceil(f_min / hz_per_bin - 1e-9) * hz_per_bin
    hi = min(np.floor(f_max / hz_per_bin + 1e-9) * hz_per_bin, rate / 2)
    return (0, seconds, lo, hi), "frequency (Hz)"


def templates(*, html: bool) -> jinja2.Environment:
    """The Jinja2 environment of ``pipeline/templates``; HTML output escapes every value."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=html,
        trim_blocks=html,
        lstrip_blocks=html,
    )
    env.filters["p"] = format_p
    env.filters["num"] = format_number
    return env


def md_code(value) -> str:
    """Inline code in Markdown."""
    return f"`{value}`"


def html_code(value) -> markupsafe.Markup:
    """Inline code in HTML, its text escaped."""
    return markupsafe.Markup("<code>{}</code>").format(value)


def data_uri(path: Path) -> str:
    """A PNG file as a ``data:`` URI, so the HTML report needs no file beside it."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def config_text(metrics: dict) -> str:
    """The resolved configuration stored in ``metrics["run"]["config"]`` as YAML ("" if absent)."""
    config = metrics.get("run", {}).get("config")
    return OmegaConf.to_yaml(OmegaConf.create(config)) if config is not None else ""


def write_report(run_dir: Path, metrics: dict, *, config_yaml: str | None = None) -> Path:
    """Render ``report.md`` and ``report.html`` into ``run_dir`` from ``metrics`` and its figures.

    Both come from one context, so they show the same numbers in the same order:
    headline table, significance, per-class figures and confusion matrices, learning
    curves, dataset, features, environment. The HTML file embeds its figures as
    ``data:`` URIs and its style sheet, so it opens anywhere on its own.

    Args:
        run_dir: the run folder; figures are read from ``run_dir/figures``.
        metrics: the contents of ``metrics.json``.
        config_yaml: the resolved configuration as YAML; None: ``metrics["run"]["config"]``.

    Returns:
        The path of ``report.md`` (``report.html`` lies beside it).
    """
    run_dir = Path(run_dir)
    header, rows = headline_rows(metrics)
    figures = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "figures").glob("*.png"))
    files = ["metrics.json", *(f"predictions/{n}.csv" for n in metrics["models"]), "skipped.csv"]
    context = {
        "m": metrics,
        "header": header,
        "rows": rows,
        "significance": significance_rows(metrics),
        "figures": figures,
        "files": [f for f in files if (run_dir / f).is_file()],
        "config_yaml": config_yaml if config_yaml is not None else config_text(metrics),
        "histories": metrics.get("histories", {}),
    }
    md = templates(html=False).get_template("report.md.j2").render(**context, code=md_code)
    page = templates(html=True).get_template("report.html.j2")
    images = {f: data_uri(run_dir / f) for f in figures}
    html = page.render(**context, code=html_code, images=images)
    atomic.write_text(run_dir / "report.html", html)
    return atomic.write_text(run_dir / "report.md", md)
