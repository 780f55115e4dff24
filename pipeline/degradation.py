"""The degradation problem of He et al. (2015), read back from a sweep over depth.

A sweep that trains a ResNet and its plain twin (``models=[resnet,plain_cnn]``) at
two or more depths (``-m resnet.depth=20,32,44,56``, or ``+experiment=degradation``)
is the paper's central experiment on signals: does a deeper plain net reach a
*higher training error* than a shallower one (degradation), and do the shortcuts
remove that? :func:`degradation` gathers, per kind (plain or residual) and depth,
the final training and test error over the seeds and the mean training and
validation error of every epoch; :func:`plot` draws the paper's Fig. 6 layout
(plain nets left, ResNets right, dashed training and bold validation error, one
colour per depth); :func:`verdict` states in one sentence what the numbers show.

Training error is the one the paper plots: the error on the (augmented) training
batches of each epoch, as training sees them. The curves' bold lines are the
validation split's error, the split a run watches while training; the test split is
scored once, at the end, and only the table shows it.
"""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import MaxNLocator

from pipeline import report

plt = report.plt  # pyplot with the Agg backend, chosen in pipeline.report

KINDS = ("plain", "residual")
LABELS = {"plain": "plain", "residual": "ResNet"}
TITLES = {"plain": "plain nets", "residual": "ResNets"}
# A rise in final training error smaller than this (absolute, as a fraction) is not
# called a rise; nor is one within two standard deviations over the seeds.
TOLERANCE = 0.01


def network_kind(config: dict, name: str) -> str | None:
    """``plain`` or ``residual`` for a model node with a ``residual`` key (the cifar or
    ImageNet ResNet and its twin); None for any other model."""
    node = config.get(name)
    if not isinstance(node, dict) or "residual" not in node or "depth" not in node:
        return None
    return "residual" if node["residual"] else "plain"


def entries(runs: list[dict]) -> list[dict]:
    """One entry per run and network: kind, depth, seed, final errors, curves, parameters."""
    found = []
    for r in runs:
        metrics = r["metrics"]
        config = metrics.get("run", {}).get("config") or {}
        for name, m in metrics["models"].items():
            kind = network_kind(config, name)
            history = metrics.get("histories", {}).get(name) or []
            if kind is None or not history:
                continue
            found.append(
                {
                    "kind": kind,
                    "name": name,
                    "depth": int(config[name]["depth"]),
                    "shortcut": config[name].get("shortcut"),
                    "seed": r["seed"],
                    "run": r["dir"],
                    "train_error": float(history[-1]["train_error"]),
                    "test_error": 1.0 - float(m["accuracy"]),
                    "n_params": m.get("n_params"),
                    "train_curve": [h["train_error"] for h in history],
                    "val_curve": [h["val_error"] for h in history],
                }
            )
    return found


def degradation(runs: list[dict]) -> dict | None:
    """The degradation section of a sweep summary; None unless the runs train both a plain
    and a residual network, each at two or more depths.

    Returns:
        ``{"depths", "shortcuts", "rows": [{kind, label, depth, n, seeds, train_error,
        test_error, n_params}], "table": [{depth, plain: row, residual: row}], "curves":
        {kind: {depth: {"train", "val"}}}, "rises", "verdict"}``: errors as mean, std
        (n - 1, None for one run) and values; curves as the per-epoch mean over the seeds
        (validation None where a run had no validation split).
    """
    found = entries(runs)
    depths = {k: sorted({e["depth"] for e in found if e["kind"] == k}) for k in KINDS}
    if any(len(depths[k]) < 2 for k in KINDS):
        return None
    rows, curves = [], {k: {} for k in KINDS}
    for kind in KINDS:
        for depth in depths[kind]:
            group = [e for e in found if e["kind"] == kind and e["depth"] == depth]
            rows.append(_row(kind, depth, group))
            curves[kind][str(depth)] = _mean_curves(group)
    rises = {k: _rise([r for r in rows if r["kind"] == k]) for k in KINDS}
    every = sorted(set(depths["plain"]) | set(depths["residual"]))
    by = {(r["kind"], r["depth"]): r for r in rows}
    gaps = {
        d: by[("plain", d)]["train_error"]["mean"] - by[("residual", d)]["train_error"]["mean"]
        for d in every
        if ("plain", d) in by and ("residual", d) in by
    }
    return {
        "depths": every,
        "table": [{"depth": d, **{k: by.get((k, d)) for k in KINDS}} for d in every],
        "shortcuts": sorted({str(e["shortcut"]) for e in found if e["kind"] == "residual"}),
        "rows": rows,
        "curves": curves,
        "rises": rises,
        "gaps": {str(d): g for d, g in gaps.items()},
        "verdict": verdict(rises) + pairs_sentence(gaps),
    }


def _row(kind: str, depth: int, group: list[dict]) -> dict:
    params = sorted({e["n_params"] for e in group if e["n_params"] is not None})
    return {
        "kind": kind,
        "label": LABELS[kind],
        "depth": depth,
        "n": len(group),
        "seeds": [e["seed"] for e in group],
        "train_error": report.spread([e["train_error"] for e in group]),
        "test_error": report.spread([e["test_error"] for e in group]),
        "n_params": params[0] if len(params) == 1 else None,
    }


def _mean_curves(group: list[dict]) -> dict:
    """Per-epoch means over the group's runs, cut to the shortest run."""
    n = min(len(e["train_curve"]) for e in group)
    train = np.mean([e["train_curve"][:n] for e in group], axis=0)
    val = [e["val_curve"][:n] for e in group]
    has_val = all(v is not None for curve in val for v in curve)
    return {
        "train": train.tolist(),
        "val": np.mean(np.asarray(val, dtype=float), axis=0).tolist() if has_val else None,
    }


def _rise(rows: list[dict]) -> dict:
    """How the final training error moves from the shallowest to the deepest net of a kind:
    ``{"from", "to", "shallow", "deep", "change", "rises", "falls"}``; a change counts only
    beyond :data:`TOLERANCE` and beyond twice the larger standard deviation of the two."""
    shallow, deep = rows[0], rows[-1]
    a, b = shallow["train_error"], deep["train_error"]
    noise = 2 * max(a["std"] or 0.0, b["std"] or 0.0)
    change = b["mean"] - a["mean"]
    margin = max(TOLERANCE, noise)
    return {
        "shallow": shallow["depth"],
        "deep": deep["depth"],
        "from": a["mean"],
        "to": b["mean"],
        "change": change,
        "margin": margin,
        "rises": change > margin,
        "falls": change < -margin,
    }


def verdict(rises: dict) -> str:
    """One sentence on what the final training errors show, built from ``rises``."""
    p, r = rises["plain"], rises["residual"]

    def span(x: dict) -> str:
        start, end = f"{100 * x['from']:.1f}%", f"{100 * x['to']:.1f}%"
        return f"{start} at {x['shallow']} layers to {end} at {x['deep']}"

    plain = f"the plain nets' final training error goes from {span(p)}"
    resnet = f"the ResNets' from {span(r)}"
    if p["rises"] and not r["rises"]:
        how = "falls" if r["falls"] else "holds"
        return (
            f"Degradation appears and the shortcuts remove it: {plain}, while {resnet} "
            f"(it {how} with depth)."
        )
    if p["rises"]:
        return (
            f"Training error rises with depth for both kinds, so the shortcuts do not remove "
            f"the degradation here: {plain}, {resnet}."
        )
    if r["rises"]:
        return (
            f"The effect is reversed here: {plain}, while {resnet}; the deeper ResNets train "
            "worse, not the plain nets."
        )
    return (
        f"Degradation did not appear in this run: {plain} and {resnet}, changes within "
        f"{100 * max(p['margin'], r['margin']):.1f} points (the tolerance or twice the spread "
        "over seeds); longer training may close the gap or a harder dataset may open it."
    )


def pairs_sentence(gaps: dict[int, float]) -> str:
    """`` At every depth ...``: how the plain nets' final training error compares with their
    ResNet twins' at each depth both were trained (the plain one minus the ResNet's)."""
    if not gaps:
        return ""
    worse = [d for d, g in gaps.items() if g > TOLERANCE]
    low, high = 100 * min(gaps.values()), 100 * max(gaps.values())
    if len(worse) == len(gaps):
        return (
            f" At every depth the plain net's final training error is above its ResNet "
            f"twin's, by {low:.1f} to {high:.1f} points."
        )
    if not worse:
        return (
            " At no depth is the plain net's final training error more than "
            f"{100 * TOLERANCE:.0f} point above its ResNet twin's."
        )
    listed = ", ".join(str(d) for d in worse)
    return f" The plain net trains worse than its ResNet twin at {listed} layers only."


def plot(section: dict):
    """Fig. 6 of the paper for this sweep: plain nets left, ResNets right, training error
    dashed and validation error bold over epochs, one colour per depth."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    colours = {d: f"C{i}" for i, d in enumerate(section["depths"])}
    top = 0.0
    for ax, kind in zip(axes, KINDS, strict=True):
        for depth, c in section["curves"][kind].items():
            epochs = np.arange(1, len(c["train"]) + 1)
            colour = colours[int(depth)]
            label = f"{LABELS[kind]}-{depth}"
            dot = "o" if len(epochs) == 1 else None  # one epoch: a point, not a line
            ax.plot(epochs, 100 * np.asarray(c["train"]), "--", color=colour, lw=1, marker=dot)
            top = max(top, 100 * max(c["train"]))
            if c["val"] is not None:
                ax.plot(
                    epochs,
                    100 * np.asarray(c["val"]),
                    "-",
                    color=colour,
                    lw=2,
                    marker=dot,
                    label=label,
                )
                top = max(top, 100 * max(c["val"]))
            else:
                ax.plot([], [], "-", color=colour, lw=2, label=label)
        ax.set_title(TITLES[kind], fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(0, min(100.0, top * 1.05 + 1))
    fig.suptitle(
        "Dashed: training error; bold: validation error (mean over seeds)", fontsize=9, y=0.99
    )
    fig.tight_layout()
    return fig


def pct(stats: dict) -> str:
    """An error's mean ± std (n - 1) in per cent, one decimal; the mean alone for one run."""
    text = f"{100 * stats['mean']:.1f}"
    return text if stats["std"] is None else f"{text} ± {100 * stats['std']:.1f}"
