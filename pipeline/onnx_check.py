"""An exported graph checked against the PyTorch predict path, on real or generated windows.

The windows come from a folder (read and cut by the bundle's front end, as ``task=predict``
reads them) or, without one, from generated test signals at the bundle's rate and window
length. The reference is :class:`pipeline.tasks.predict.Classifier` in float32 (no mixed
precision), which is what ``task=predict predict.amp=false`` computes; its file labels
aggregate the windows' probabilities by their mean (``predict.aggregate=mean``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.bundle import Bundle
from pipeline.errors import ConfigError, SignalError
from pipeline.tasks.predict import Classifier, aggregate, iter_files

log = logging.getLogger(__name__)

BATCH = 256  # windows per onnxruntime and PyTorch call


@dataclass
class CheckWindows:
    """Windows to check on, grouped by file.

    Attributes:
        x: float32 (n, channels, samples).
        files: each file's (name, first window, window count, true class or None).
        source: where they came from, for the printed summary.
    """

    x: np.ndarray
    files: list[tuple[str, int, int, str | None]]
    source: str

    @property
    def labelled(self) -> list[int]:
        """Indices of the files whose class folder names a bundle class."""
        return [i for i, f in enumerate(self.files) if f[3] is not None]


def folder_windows(
    folder: Path, classify: Classifier, *, limit: int | None, key: str = "export.check_input"
) -> CheckWindows:
    """The windows of the files under ``folder`` (sorted, so a limit is reproducible), file by
    file until ``limit`` windows are reached (the last file's cut there); unreadable files
    are left out.

    Raises:
        ConfigError: ``folder`` does not exist or none of its files gives a window.
    """
    if not folder.exists():
        raise ConfigError(f"{key}={str(folder)!r} does not exist; give a folder of signal files")
    root = folder if folder.is_dir() else folder.parent
    classes = classify.bundle.classes
    xs, files, n = [], [], 0
    for path in sorted(iter_files(folder)):
        try:
            w = classify.frontend.windows(path, channels=classify.in_channels).x
        except SignalError as err:
            log.info("%s: left out of the check: %s", key, err)
            continue
        w = w[: limit - n] if limit is not None else w
        parts = path.relative_to(root).parts
        true = parts[0] if len(parts) > 1 and parts[0] in classes else None
        files.append((str(path), n, len(w), true))
        xs.append(w)
        n += len(w)
        if limit is not None and n >= limit:
            break
    if not files:
        raise ConfigError(
            f"{key}={str(folder)!r}: no file there gives a window the bundle can classify; "
            "give a folder of the bundle's kind of recordings"
        )
    return CheckWindows(np.concatenate(xs), files, f"{len(files)} file(s) under {folder}")


def generated_windows(channels: int, samples: int, rate: int, *, n: int = 48) -> CheckWindows:
    """``n`` generated windows (n, channels, samples): tones with noise, noise alone, chirps,
    at levels from 1e-3 to 1, one silent window and one of 1e30; each its own "file"."""
    rng = np.random.default_rng(0)
    t = np.arange(samples) / rate
    x = np.empty((n, channels, samples), np.float32)
    for i in range(n):
        level = 10 ** rng.uniform(-3, 0)
        f0, f1 = rng.uniform(0.01, 0.45, size=2) * rate
        kind = i % 3
        if kind == 0:  # a tone in noise
            s = np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi, (channels, 1)))
            s = s + 0.3 * rng.standard_normal((channels, samples))
        elif kind == 1:  # noise
            s = rng.standard_normal((channels, samples))
        else:  # a chirp from f0 to f1
            s = np.sin(2 * np.pi * (f0 + (f1 - f0) * t / (2 * t[-1] + 1e-12)) * t)
            s = np.broadcast_to(s, (channels, samples))
        x[i] = level * s
    x[-1] = 0.0
    x[-2] = 1e30  # its power spectrum overflows float32: predict refuses it, the graph gives NaN
    files = [(f"test signal {i}", i, 1, None) for i in range(n)]
    return CheckWindows(x, files, f"{n} generated test signals")


def run_graph(path: Path, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """The graph's outputs ``names`` for input ``x`` (n, ...), in batches, on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    parts = [session.run(names, {feed: x[i : i + BATCH]}) for i in range(0, len(x), BATCH)]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}


@torch.no_grad()
def reference(classify: Classifier, x: np.ndarray) -> dict[str, np.ndarray]:
    """The predict path's probabilities (n, classes), its network's inputs and logits."""
    probs, inputs, logits = [], [], []
    for i in range(0, len(x), BATCH):
        w = x[i : i + BATCH]
        probs.append(classify(w))
        images = classify.images(w)
        inputs.append(images.numpy())
        logits.append(classify.model(images).float().numpy())
    return {
        "probabilities": np.concatenate(probs),
        "inputs": np.concatenate(inputs).astype(np.float32),
        "logits": np.concatenate(logits),
    }


def file_labels(probs: np.ndarray, windows: CheckWindows) -> np.ndarray:
    """Each file's class index from its windows' mean probabilities."""
    return np.array(
        [int(aggregate(probs[a : a + n], "mean").argmax()) for _, a, n, _ in windows.files]
    )


def classified(windows: CheckWindows, ok: np.ndarray) -> CheckWindows:
    """The files every window of which the predict path classifies (``ok``: (n,) bool)."""
    files = [f for f in windows.files if ok[f[1] : f[1] + f[2]].all()]
    return CheckWindows(windows.x, files, windows.source)


def compare(got: np.ndarray, want: np.ndarray, windows: CheckWindows, *, key: str) -> dict:
    """Largest |difference| of ``key`` (probabilities or logits), window and file labels that
    differ; windows the predict path refuses (a non-finite image: NaN) are left out."""
    ok = np.isfinite(want).all(axis=1)
    diff = float(np.abs(got[ok] - want[ok]).max(initial=0.0))
    window_labels = int((got[ok].argmax(1) != want[ok].argmax(1)).sum())
    kept = classified(windows, ok)
    files = kept.files
    file_diff = int((file_labels(got, kept) != file_labels(want, kept)).sum()) if files else 0
    return {
        "compared": key,
        "max_abs_diff": diff,
        "windows": int(ok.sum()),
        "window_labels_differ": window_labels,
        "files": len(files),
        "file_labels_differ": file_diff,
    }


def parity(path: Path, bundle: Bundle, windows: CheckWindows, *, graph: str) -> dict:
    """The graph at ``path`` against the predict path on ``windows``.

    ``graph`` ``waveform``: its probabilities against predict's (and its logits, reported);
    ``image``: its logits on predict's inputs against the network's.
    """
    classify = Classifier(bundle, device=torch.device("cpu"), amp=False)
    want = reference(classify, windows.x)
    if graph == "waveform":
        got = run_graph(path, windows.x, ["probabilities", "logits"])
        result = compare(got["probabilities"], want["probabilities"], windows, key="probabilities")
        ok = np.isfinite(want["logits"]).all(axis=1)
        diff = np.abs(got["logits"][ok] - want["logits"][ok])
        result["max_abs_diff_logits"] = float(diff.max(initial=0.0))
        if bundle.meta.get("input", "image") == "image":  # a raw window has no image in the graph
            refused = ~np.isfinite(want["probabilities"]).all(axis=1)
            graph_refused = ~np.isfinite(got["probabilities"]).all(axis=1)
            result["refused_differ"] = int((refused != graph_refused).sum())
        result["probabilities"] = got["probabilities"]
    else:
        got = run_graph(path, want["inputs"], ["logits"])
        result = compare(got["logits"], want["logits"], windows, key="logits")
        result["probabilities"] = classify_probabilities(got["logits"], bundle)
    result["reference"] = want["probabilities"]
    return result


def classify_probabilities(logits: np.ndarray, bundle: Bundle) -> np.ndarray:
    """softmax(logits / temperature), the image graph's probabilities computed outside it."""
    z = logits / float(bundle.meta.get("temperature", 1.0))
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def accuracy(probs: np.ndarray, windows: CheckWindows, classes: list[str]) -> float | None:
    """File accuracy on the labelled files (None without any)."""
    labelled = windows.labelled
    if not labelled:
        return None
    labels = file_labels(probs, windows)
    return float(np.mean([classes[labels[i]] == windows.files[i][3] for i in labelled]))


def agreement(
    probs: np.ndarray,
    base: np.ndarray,
    reference: np.ndarray,
    windows: CheckWindows,
    classes: list[str],
) -> dict:
    """An int8 graph's probabilities ``probs`` against the float32 graph's ``base``: labels
    that agree, file accuracies, on the windows and files the predict path classifies (its
    ``reference`` probabilities finite)."""
    ok = np.isfinite(reference).all(axis=1)
    kept = classified(windows, ok)
    same = file_labels(probs, kept) == file_labels(base, kept) if kept.files else np.zeros(0)
    return {
        "window_labels_agree": int((probs[ok].argmax(1) == base[ok].argmax(1)).sum()),
        "windows": int(ok.sum()),
        "file_labels_agree": int(same.sum()),
        "files": len(kept.files),
        "accuracy": accuracy(probs, kept, classes),
        "accuracy_float32": accuracy(base, kept, classes),
        "labelled": len(kept.labelled),
        "max_abs_diff": float(np.abs(probs[ok] - base[ok]).max(initial=0.0)),
    }
