"""Render a run's outputs for people: figures, report.md and the printed summary.

Everything here reads only ``metrics.json``-shaped data (and, for the example
spectrograms, the images passed in), so a report can be rendered again from a
finished run without retraining.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")  # no display: figures go to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline import atomic  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"
PROJECT_ROOT = Path(__file__).resolve().parents[1]

# (key in metrics, column title, format, higher is better)
HEADLINE = [
    ("accuracy", "accuracy", "{:.4f}", True),
    ("balanced_accuracy", "balanced acc.", "{:.4f}", True),
    ("macro_f1", "macro-F1", "{:.4f}", True),
    ("file_accuracy", "file acc.", "{:.4f}", True),
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
            cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def headline_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Column titles and formatted rows of the headline table; the best value per column in bold."""
    models = metrics["models"]
    columns = [c for c in HEADLINE if any(c[0] in m for m in models.values())]
    best = {}
    for key, _, _, higher in columns:
        values = [m[key] for m in models.values() if key in m]
        if higher is not None and len(values) > 1:
            best[key] = max(values) if higher else min(values)
    rows = []
    for name, m in models.items():
        row = [name]
        for key, _, fmt, _ in columns:
            if key not in m:
                row.append("–")
                continue
            cell = fmt.format(m[key])
            row.append(f"**{cell}**" if key in best and m[key] == best[key] else cell)
        rows.append(row)
    return ["model", *(c[1] for c in columns)], rows


def summary_table(metrics: dict) -> str:
    """A compact plain-text table for the terminal."""
    header, rows = headline_rows(metrics)
    rows = [[cell.replace("**", "") for cell in row] for row in rows]
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
        written["learning_curves"] = _save(
            plot_learning_curves(metrics["histories"]), fig_dir / "learning_curves.png"
        )
    for name, m in metrics["models"].items():
        fig = plot_confusion(np.asarray(m["confusion"]), metrics["dataset"]["classes"], title=name)
        written[f"confusion_{name}"] = _save(fig, fig_dir / f"confusion_{name}.png")
    if examples is not None:
        fig = plot_examples(examples, metrics)
        written["examples"] = _save(fig, fig_dir / "examples.png")
    return {k: str(Path(v).relative_to(run_dir)) for k, v in written.items()}


def _save(fig, path: Path) -> Path:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_learning_curves(histories: dict[str, list[dict]]):
    """Training (dashed) and validation (solid) error against epoch, one colour per network."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
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
        ax.plot(
            epochs,
            [100 * h["val_error"] for h in history],
            "-",
            color=color,
            lw=2,
            label=f"{name} val",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_title("Learning curves (dashed: training, bold: validation)")
    ax.grid(alpha=0.3)
    ax.legend()
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
    rate = metrics["dataset"]["sample_rate"]
    seconds = metrics["dataset"]["segment_samples"] / rate
    f = metrics["features"]
    unit = "dB" if f["scale"] == "db" else f["scale"]
    f_min = f.get("f_min") or 0.0
    f_max = f.get("f_max") or rate / 2
    if f.get("n_mels"):
        extent = (0, seconds, 0, f["n_mels"])
        ylabel = f"mel band ({f_min:g}-{f_max:g} Hz)"
    else:
        hz_per_bin = rate / f["n_fft"]
        # the first and last FFT bins the crop keeps, as in STFTParams.bins
        lo = np.ceil(f_min / hz_per_bin - 1e-9) * hz_per_bin
        hi = min(np.floor(f_max / hz_per_bin + 1e-9) * hz_per_bin, rate / 2)
        extent = (0, seconds, lo, hi)
        ylabel = "frequency (Hz)"
    n = len(images)
    cols = min(n, max(4, int(np.ceil(np.sqrt(n)))))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.6 * cols + 0.8, 2.1 * rows + 0.6), squeeze=False,
        sharex=True, sharey=True, layout="constrained",
    )  # fmt: skip
    first = images[:, 0]
    vmin, vmax = float(first.min()), float(first.max())
    for ax in axes.flat[n:]:
        ax.axis("off")
    im = None
    for i, (ax, image, name) in enumerate(zip(axes.flat, first, classes, strict=False)):
        im = ax.imshow(
            image, origin="lower", aspect="auto", extent=extent, cmap="magma",
            vmin=vmin, vmax=vmax, interpolation="nearest",
        )  # fmt: skip
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


def write_report(run_dir: Path, metrics: dict, *, config_yaml: str) -> Path:
    """Render ``report.md`` into ``run_dir`` from ``metrics`` and the figures present there."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    header, rows = headline_rows(metrics)
    figures = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "figures").glob("*.png"))
    text = env.get_template("report.md.j2").render(
        m=metrics,
        header=header,
        rows=rows,
        figures=figures,
        config_yaml=config_yaml,
        histories=metrics.get("histories", {}),
    )
    return atomic.write_text(run_dir / "report.md", text)
