"""The figures of :mod:`pipeline.explain`: class maps over the mean test image, their
frequency profiles, and the gallery of misclassified test images.

Axes as the report's example images draw them (:func:`pipeline.report.plot_examples`): time
in seconds across, frequency in Hz (or mel bands) up, first channel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.report import plt  # pyplot with the report's file-only backend (Agg)


def _panels(n: int, *, title: str, width: float = 2.6, height: float = 2.1):
    """A figure of ``n`` panels in a grid grown to about square (at least 4 across), the
    unused panels hidden, and an axis for a colour bar on the right; returns
    ``(fig, axes, cols, bar_axis)``.

    Margins are fixed in inches rather than computed by a layout engine, which took most of
    the time these figures cost (matplotlib's constrained layout measures every label).
    """
    cols = min(n, max(4, int(np.ceil(np.sqrt(n)))))
    rows = int(np.ceil(n / cols))
    left, right, bottom, top, bar = 0.6, 0.9, 0.5, 0.75, 0.15  # inches
    fig_w, fig_h = width * cols + left + right, height * rows + bottom + top
    fig, axes = plt.subplots(
        rows, cols, figsize=(fig_w, fig_h), squeeze=False, sharex=True, sharey=True
    )
    fig.subplots_adjust(
        left=left / fig_w,
        right=1 - right / fig_w,
        bottom=bottom / fig_h,
        top=1 - top / fig_h,
        wspace=0.12,
        hspace=0.45,
    )
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10, y=1 - 0.15 / fig_h, va="top")
    bar_axis = fig.add_axes(
        (1 - (right - 0.15) / fig_w, bottom / fig_h + 0.15, bar / fig_w, 0.7 - 0.3 / rows)
    )
    return fig, axes, cols, bar_axis


def _label(ax, i: int, n: int, cols: int, ylabel: str) -> None:
    """Axis labels on the left column and the lowest panel of each column only."""
    ax.tick_params(labelsize=6)
    if i % cols == 0:
        ax.set_ylabel(ylabel, fontsize=7)
    if i + cols >= n:
        ax.set_xlabel("time (s)", fontsize=7)
        ax.xaxis.set_tick_params(labelbottom=True)


def plot_attention(
    mean_images: np.ndarray,
    maps: np.ndarray,
    *,
    classes: list[str],
    captions: list[str],
    extent: tuple[float, float, float, float],
    ylabel: str,
    title: str,
):
    """Each class's mean test image (grey) under its mean Grad-CAM map (colour, 0 to 1).

    Args:
        mean_images: (n_classes, H, W); maps: (n_classes, H, W), NaN for a class without
            test images (its panel stays empty).
        captions: one line per class under its name (the peak band).
    """
    n = len(classes)
    fig, axes, cols, bar_axis = _panels(n, title=title)
    im = None
    for i, ax in enumerate(axes.flat[:n]):
        ax.set_title(f"{classes[i][:24]}\n{captions[i]}", fontsize=7)
        _label(ax, i, n, cols, ylabel)
        if np.isnan(maps[i]).any():
            continue
        shown = {"origin": "lower", "aspect": "auto", "extent": extent}
        ax.imshow(mean_images[i], cmap="gray", interpolation="nearest", **shown)
        im = ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=0, vmax=1, **shown)
    if im is not None:
        fig.colorbar(im, cax=bar_axis).set_label("attention (Grad-CAM)", fontsize=8)
    else:
        bar_axis.axis("off")
    return fig


def plot_profiles(
    profiles: np.ndarray,
    *,
    centres_hz: np.ndarray,
    classes: list[str],
    bands_hz: list[tuple[float, float] | None],
    title: str,
):
    """Each class's attention averaged over time against frequency, its peak band shaded.

    Args:
        profiles: (n_classes, H), NaN for a class without test images (left out).
        centres_hz: the frequency of each row's centre (H,).
        bands_hz: each class's peak band (lo, hi) in Hz, or None.
    """
    fig, ax = plt.subplots(figsize=(7.6, 3.8))
    fig.subplots_adjust(left=0.09, right=0.76, bottom=0.13, top=0.91)
    for c, (profile, band) in enumerate(zip(profiles, bands_hz, strict=True)):
        if band is None or np.isnan(profile).any():
            continue
        color = f"C{c % 10}"
        ax.plot(centres_hz, profile, color=color, lw=1.5, label=classes[c][:24])
        ax.axvspan(*band, color=color, alpha=0.08)
    ax.set_xlabel("frequency (Hz)")
    ax.set_ylabel("attention, mean over time")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=8)  # beside
    return fig


def plot_gallery(
    images: np.ndarray,
    captions: list[str],
    *,
    extent: tuple[float, float, float, float],
    ylabel: str,
    unit: str,
    title: str,
):
    """Misclassified test images (first channel), one colour scale, each with its caption
    (true and predicted class, confidence, file and time)."""
    n = len(images)
    fig, axes, cols, bar_axis = _panels(n, title=title, height=2.3)
    vmin, vmax = float(images.min()), float(images.max())
    im = None
    for i, ax in enumerate(axes.flat[:n]):
        im = ax.imshow(
            images[i],
            origin="lower",
            aspect="auto",
            extent=extent,
            cmap="magma",
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
        )
        ax.set_title(captions[i], fontsize=6.5)
        _label(ax, i, n, cols, ylabel)
    fig.colorbar(im, cax=bar_axis).set_label(unit, fontsize=8)
    return fig


def save(fig, path: Path) -> Path:
    """Save ``fig`` as a PNG at ``path`` atomically and close it; its margins are fixed, so no
    tight bounding box is measured (:func:`pipeline.report.save_figure` measures one)."""
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
