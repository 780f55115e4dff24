"""The reliability diagrams of a run: one panel per model, from ``metrics.json`` alone.

Each model's ``calibration`` record (:mod:`pipeline.calibration`) holds its bins before
and after temperature scaling, so a report rendered again draws the same figure.
"""

from __future__ import annotations

import logging
import time

import matplotlib

matplotlib.use("Agg")  # no display: figures go to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger(__name__)


def calibrated_models(metrics: dict) -> dict[str, dict]:
    """{model: its ``calibration`` record}, for the models that have one (a run from before
    calibration was recorded has none)."""
    return {n: m["calibration"] for n, m in metrics["models"].items() if "calibration" in m}


def plot(metrics: dict):
    """Accuracy per confidence bin (bars, after temperature scaling; circles, before) against
    the diagonal, and below each panel the share of test windows per bin; None without
    calibration records."""
    records = calibrated_models(metrics)
    if not records:
        return None
    t0 = time.perf_counter()
    n = len(records)
    fig, axes = plt.subplots(
        2,
        n,
        figsize=(3.0 * n + 0.4, 4.3),
        squeeze=False,
        sharex=True,
        height_ratios=[3, 1],
        layout="constrained",
    )
    for j, (name, rec) in enumerate(records.items()):
        _panel(axes[0, j], axes[1, j], name, rec, first=j == 0)
    fig.suptitle("Reliability on the test split (bars: as reported; circles: before T)", fontsize=9)
    log.info("reliability diagrams of %d model(s) in %.2f s", n, time.perf_counter() - t0)
    return fig


def _panel(ax, share, name: str, rec: dict, *, first: bool) -> None:
    """One model's reliability diagram (``ax``) and its bin counts (``share``)."""
    after = rec["after"]["reliability"]
    edges = np.asarray(after["edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    acc = np.array([np.nan if a is None else a for a in after["accuracy"]])
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.bar(centres, np.nan_to_num(acc), width * 0.95, color="C0", alpha=0.8, label="accuracy")
    title = f"{name}: ECE {rec['after']['ece']:.3f}"
    if "before" in rec:
        before = rec["before"]["reliability"]
        conf = [np.nan if c is None else c for c in before["confidence"]]
        acc_b = [np.nan if a is None else a for a in before["accuracy"]]
        ax.plot(conf, acc_b, "o", mfc="none", color="C3", ms=4, label="before T")
        title = (
            f"{name}: T={rec['temperature']:.2f}\n"
            f"ECE {rec['before']['ece']:.3f} → {rec['after']['ece']:.3f}"
        )
    else:
        title += "\n(not scaled)"
    ax.set_title(title, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    count = np.asarray(after["count"], dtype=float)
    share.bar(centres, count / max(count.sum(), 1.0), width * 0.95, color="grey")
    share.set_xlabel("confidence (top-class probability)", fontsize=7)
    share.tick_params(labelsize=7)
    if first:
        ax.set_ylabel("accuracy in the bin", fontsize=7)
        share.set_ylabel("share", fontsize=7)
        ax.legend(loc="upper left", fontsize=6, frameon=False)
