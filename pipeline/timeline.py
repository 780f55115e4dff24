"""When each class occurs in a long recording: predict's timeline and ``predictions.html``.

A long file (an hour of a machine, a night of a microphone) gets one probability row per
window from predict. Here those rows become segments of one predicted class:

    probabilities (windows, classes) --running median over ``smooth`` windows, per class
        --> labels (windows,) --runs of one label--> segments (start s, end s, class,
        mean confidence)

A window stands for the time around its centre: the boundary between two consecutive
windows is halfway between their centres, so with windows that do not overlap a segment
runs from its first window's start to the next segment's first window's start; the first
segment starts at the first window's start, the last ends with the last window (a
zero-padded tail window may reach past the file's end). The confidence of a segment is
the mean, over its windows, of the classifier's own (unsmoothed) probability of its
class. The median removes isolated flips shorter than half the filter
(``smooth=3``: one window) and moves no boundary between runs longer than that.

:class:`Timeline` writes ``<stem>_timeline.csv`` (every timeline file's segments, as they
come) and ``<stem>.html``: for a folder, the files per predicted class, a histogram of the
files' confidence and the first errors; for each of the first ``max_files`` timeline
files, a figure (the predicted class as coloured bands over time, each class's
probability under it) and its segments. Memory stays bounded by the number of files:
only the figures' PNGs (tens of kB each) and at most :data:`TABLE_ROWS` segments per
figure are kept.
"""

from __future__ import annotations

import base64
import csv
import io
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: figures go to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy.ndimage import median_filter  # noqa: E402

from pipeline import atomic  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.values import is_whole  # noqa: E402

log = logging.getLogger(__name__)

TABLE_ROWS = 200  # segments shown per file in the HTML (all of them are in the CSV)
ERROR_ROWS = 50  # errors listed in the HTML (all of them are in the errors CSV)
BINS = 20  # of the confidence histogram, over [0, 1]


@dataclass(frozen=True)
class TimelineSettings:
    """``predict.timeline*``.

    Attributes:
        mode: ``auto`` (files of at least ``min_windows`` windows), True (every file) or
            False (no timeline, no HTML).
        min_windows: the windows a file needs for a timeline under ``auto``.
        max_files: the most timeline figures in the HTML (the first files found).
        smooth: the running median's width in windows (odd; 1: none).
    """

    mode: str | bool = "auto"
    min_windows: int = 60
    max_files: int = 20
    smooth: int = 3


def timeline_settings(*, timeline, min_windows, max_files, smooth) -> TimelineSettings | None:
    """The timeline settings checked; None for ``predict.timeline=false``.

    Raises:
        ConfigError: naming the first bad setting, its value and the fix.
    """
    if not (timeline == "auto" or isinstance(timeline, bool)):
        raise ConfigError(
            f"predict.timeline={timeline!r} must be auto (a timeline for each file of at "
            "least predict.timeline_min_windows windows), true (every file) or false (none)"
        )
    if not is_whole(min_windows, minimum=1):
        raise ConfigError(
            f"predict.timeline_min_windows={min_windows!r} must be a positive integer (the "
            "windows a file needs for a timeline under predict.timeline=auto)"
        )
    if not is_whole(max_files, minimum=0):
        raise ConfigError(
            f"predict.timeline_files={max_files!r} must be a whole number (the most timeline "
            "figures in predictions.html; 0: the CSV only)"
        )
    if not is_whole(smooth, minimum=1) or smooth % 2 == 0:
        raise ConfigError(
            f"predict.timeline_smooth={smooth!r} must be an odd positive integer (the running "
            "median's width in windows; 1: no smoothing)"
        )
    if timeline is False:
        return None
    return TimelineSettings(timeline, int(min_windows), int(max_files), int(smooth))


def timeline_paths(output: Path) -> list[Path]:
    """The timeline CSV and the HTML page beside predict's CSV ``output``."""
    html = output.with_suffix(".html")
    if html == output:  # predict.output=<name>.html: the page may not replace the CSV
        html = output.with_name(output.name + ".html")
    return [output.with_name(output.stem + "_timeline.csv"), html]


def smoothed_labels(probs: np.ndarray, smooth: int) -> np.ndarray:
    """(windows,) the class of each window after a running median of ``smooth`` windows
    over each class's probability (windows, classes); edges repeat the end windows."""
    if smooth > 1 and len(probs) > 1:
        probs = median_filter(probs, size=(smooth, 1), mode="nearest")
    return probs.argmax(axis=1)


@dataclass(frozen=True)
class Segment:
    """A run of windows of one predicted class."""

    start: float  # seconds
    end: float
    label: int
    confidence: float  # mean probability of ``label`` over the run's windows
    windows: int


def segments(
    probs: np.ndarray, starts: np.ndarray, *, window_seconds: float, smooth: int = 1
) -> list[Segment]:
    """Runs of one predicted class in a file's windows.

    Args:
        probs: (windows, classes) the windows' probabilities, in time order.
        starts: (windows,) each window's start in seconds.
        window_seconds: a window's length.
        smooth: the running median's width (see :func:`smoothed_labels`).
    """
    labels = smoothed_labels(probs, smooth)
    cuts = np.flatnonzero(np.diff(labels)) + 1  # first window of every run after the first
    firsts = np.concatenate([[0], cuts])
    lasts = np.concatenate([cuts, [len(labels)]])  # one past each run's last window
    centre = starts + window_seconds / 2
    out = []
    for a, b in zip(firsts, lasts, strict=True):
        start = starts[0] if a == 0 else (centre[a - 1] + centre[a]) / 2
        end = starts[-1] + window_seconds if b == len(labels) else (centre[b - 1] + centre[b]) / 2
        k = int(labels[a])
        out.append(Segment(float(start), float(end), k, float(probs[a:b, k].mean()), int(b - a)))
    return out


def plot_timeline(
    probs: np.ndarray,
    starts: np.ndarray,
    found: list[Segment],
    classes: list[str],
    *,
    window_seconds: float,
    title: str,
):
    """The predicted class as coloured bands over time (top) and each class's probability
    at the windows' centres (bottom), the predicted class's span shaded in both."""
    colours = [plt.get_cmap("tab10")(k % 10) for k in range(len(classes))]
    fig, (bands, curves) = plt.subplots(
        2, 1, sharex=True, figsize=(10, 3.6), gridspec_kw={"height_ratios": [1, 3]}
    )
    for k in range(len(classes)):  # one collection per class: a flickering file has thousands
        spans = [(s.start, s.end - s.start) for s in found if s.label == k]
        bands.broken_barh(spans, (0, 1), facecolors=colours[k], lw=0)
        curves.broken_barh(spans, (0, 1), facecolors=colours[k], alpha=0.12, lw=0)
    centre = starts + window_seconds / 2
    for k, name in enumerate(classes):
        curves.plot(centre, probs[:, k], color=colours[k], lw=0.9, label=name)
    bands.set_ylim(0, 1)
    bands.set_yticks([])
    bands.set_title(title, fontsize=10, loc="left")
    handles = [Patch(color=colours[k], label=name) for k, name in enumerate(classes)]
    bands.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    curves.set_xlim(found[0].start, found[-1].end)
    curves.set_ylim(0, 1)
    curves.set_ylabel("probability")
    curves.set_xlabel("time (s)")
    return fig


def plot_confidence(hist: np.ndarray, classes: list[str]):
    """Files per confidence bin (stacked by predicted class)."""
    edges = np.linspace(0, 1, BINS + 1)
    fig, ax = plt.subplots(figsize=(6, 2.8))
    bottom = np.zeros(BINS)
    for k, name in enumerate(classes):
        ax.bar(edges[:-1], hist[k], width=1 / BINS, bottom=bottom, align="edge", label=name)
        bottom += hist[k]
    ax.set_xlim(0, 1)
    ax.set_xlabel("file confidence (its predicted class's score)")
    ax.set_ylabel("files")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False, fontsize=8)
    return fig


def png_uri(fig) -> str:
    """``fig`` as a PNG ``data:`` URI (closed after), so the page needs no file beside it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Timeline:
    """predict's timeline outputs, fed one classified file at a time (:meth:`add`); a
    context manager: the CSV and the HTML are renamed into place only if the run completes.
    """

    def __init__(
        self,
        settings: TimelineSettings,
        *,
        classes: list[str],
        window_seconds: float,
        paths: list[Path],
        about: dict,
    ) -> None:
        self.settings, self.classes, self.window_seconds = settings, classes, window_seconds
        self.csv_path, self.html_path = paths
        self.about = about  # model, input: the page's heading
        self.figures: list[dict] = []
        self.timelines = 0
        self.counts = np.zeros(len(classes), np.int64)  # files per predicted class
        self.hist = np.zeros((len(classes), BINS), np.int64)
        self.errors: list[tuple[str, str]] = []
        self.n_errors = 0
        self._stack = ExitStack()

    def __enter__(self) -> Timeline:
        tmp = self._stack.enter_context(atomic.atomic_path(self.csv_path))
        handle = self._stack.enter_context(open(tmp, "w", newline="", encoding="utf-8"))
        self._handle = handle
        self._csv = csv.writer(handle)
        self._csv.writerow(
            [
                "path",
                "segment",
                "start_seconds",
                "end_seconds",
                "predicted",
                "confidence",
                "windows",
            ]
        )
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._handle.flush()
            atomic.write_text(self.html_path, self.html())
        self._stack.__exit__(*exc)

    def wants(self, n: int) -> bool:
        """Whether a file of ``n`` windows gets a timeline."""
        return self.settings.mode is True or n >= self.settings.min_windows

    def error(self, path: Path, reason: str) -> None:
        """A file that could not be classified, for the page's errors table."""
        self.n_errors += 1
        if len(self.errors) < ERROR_ROWS:
            self.errors.append((str(path), reason))

    def add(self, path: Path, starts: np.ndarray, probs: np.ndarray, scores: np.ndarray) -> None:
        """One classified file: ``starts`` (windows,) in seconds, ``probs`` (windows,
        classes) in time order, ``scores`` (classes,) the file's aggregated scores."""
        k = int(scores.argmax())
        self.counts[k] += 1
        self.hist[k, min(BINS - 1, int(scores[k] * BINS))] += 1
        if not self.wants(len(probs)):
            return
        found = segments(
            probs, starts, window_seconds=self.window_seconds, smooth=self.settings.smooth
        )
        for j, s in enumerate(found):
            self._csv.writerow(
                [
                    str(path),
                    j,
                    f"{s.start:.6g}",
                    f"{s.end:.6g}",
                    self.classes[s.label],
                    f"{s.confidence:.6g}",
                    s.windows,
                ]
            )
        self.timelines += 1
        if len(self.figures) < self.settings.max_files:
            self.figures.append(self._figure(path, starts, probs, found))

    def _figure(self, path: Path, starts, probs, found: list[Segment]) -> dict:
        fig = plot_timeline(
            probs, starts, found, self.classes, window_seconds=self.window_seconds, title=path.name
        )
        rows = [
            {
                "start": f"{s.start:.2f}",
                "end": f"{s.end:.2f}",
                "label": self.classes[s.label],
                "confidence": f"{s.confidence:.3f}",
                "windows": s.windows,
            }
            for s in found[:TABLE_ROWS]
        ]
        seconds = found[-1].end - found[0].start
        return {
            "path": str(path),
            "name": path.name,
            "image": png_uri(fig),
            "rows": rows,
            "n_segments": len(found),
            "windows": len(probs),
            "seconds": f"{seconds:.1f}",
        }

    def html(self) -> str:
        """The page: the folder's summary, then each timeline figure with its segments."""
        from pipeline.report import templates  # matplotlib set up there too; imported late

        files = int(self.counts.sum())
        histogram = png_uri(plot_confidence(self.hist, self.classes)) if files else None
        return (
            templates(html=True)
            .get_template("predictions.html.j2")
            .render(
                about=self.about,
                classes=self.classes,
                counts=[int(c) for c in self.counts],
                files=files,
                histogram=histogram,
                figures=self.figures,
                timelines=self.timelines,
                settings=self.settings,
                window_seconds=f"{self.window_seconds:.4g}",
                csv_name=self.csv_path.name,
                errors=self.errors,
                n_errors=self.n_errors,
                table_rows=TABLE_ROWS,
            )
        )
