"""Classify a folder of audio files with a waveform-in ONNX graph from ``task=export``.

Needs numpy, soundfile and onnxruntime only: no PyTorch, not this project's package.

    python docs/examples/onnx_classify.py model.onnx recordings/ > labels.csv

The sidecar ``model.json`` beside the graph says how ``task=predict`` reads a file: the
rate, the channels (``mix``: their mean; ``all``; or a list of indices), the window length
and hop in samples, and whether a short file and a long tail are zero-padded. Each file is
cut into windows so, the graph gives every window's class probabilities, and their mean is
the file's (``predict.aggregate=mean``). Files at another rate are refused: resample them
first (``task=predict`` resamples with a polyphase filter).

Prints ``path,label,confidence`` and each class's probability, one row per file (CSV).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import soundfile as sf

SUFFIXES = (".wav", ".flac", ".ogg")


def read(path: Path, meta: dict) -> np.ndarray:
    """The file's samples (channels, n), float32, with the bundle's channels."""
    data, rate = sf.read(path, dtype="float32", always_2d=True)  # (n, channels)
    if rate != meta["sample_rate"]:
        raise ValueError(f"{path}: {rate} Hz, the model takes {meta['sample_rate']} Hz; resample")
    x = data.T
    channels = meta["channels"]
    if channels == "mix":  # the mean in float64, as the pipeline mixes
        return x.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
    return x if channels == "all" else x[list(channels)]


def windows(x: np.ndarray, *, length: int, hop: int, pad: bool) -> np.ndarray:
    """(channels, n) -> (windows, channels, length): a window every ``hop`` samples; with
    ``pad``, a short signal and a tail of at least half a window are zero-padded."""
    channels, n = x.shape
    if n < length and not pad:
        return np.empty((0, channels, length), np.float32)
    if n < length:
        return np.pad(x, ((0, 0), (0, length - n)))[None]
    starts = list(range(0, n - length + 1, hop))
    if pad and n - (starts[-1] + hop) >= length // 2 and starts[-1] + length < n:
        x = np.pad(x, ((0, 0), (0, starts[-1] + hop + length - n)))
        starts.append(starts[-1] + hop)
    return np.stack([x[:, s : s + length] for s in starts]).astype(np.float32)


def classify_folder(graph: Path, folder: Path, *, batch_size: int = 256) -> list[tuple]:
    """(path, label, confidence, probabilities) of every audio file under ``folder``."""
    meta = json.loads(graph.with_suffix(".json").read_text())
    if meta.get("graph") != "waveform":
        raise SystemExit(f"{graph}: not a waveform-in graph; export it with export.input=waveform")
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    name = meta["input"]["name"]
    shape = dict(length=meta["window_samples"], hop=meta["hop_samples"], pad=meta["pad"])
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)
    rows, pending = [], []

    def flush() -> None:
        if not pending:
            return
        x = np.concatenate([w for _, w in pending])
        probs = np.concatenate(
            [
                session.run(["probabilities"], {name: x[i : i + batch_size]})[0]
                for i in range(0, len(x), batch_size)
            ]
        )
        at = 0
        for path, w in pending:
            p = probs[at : at + len(w)].mean(axis=0)
            at += len(w)
            if not np.isfinite(p).all():  # a window's power spectrum overflowed float32
                print(f"skipped: {path}: its STFT image is not finite; rescale it", file=sys.stderr)
                continue
            best = int(p.argmax())
            rows.append((path, meta["classes"][best], float(p[best]), p))
        pending.clear()

    for path in paths:
        try:
            w = windows(read(path, meta), **shape)
        except (sf.LibsndfileError, ValueError) as err:  # unreadable, or at another rate
            print(f"skipped: {err}", file=sys.stderr)
            continue
        if len(w):
            pending.append((path, w))
        if sum(len(w) for _, w in pending) >= batch_size:
            flush()
    flush()
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graph", type=Path, help="the .onnx file (its .json sidecar beside it)")
    parser.add_argument("folder", type=Path, help="a folder of .wav, .flac or .ogg files")
    parser.add_argument("--batch-size", type=int, default=256, help="windows per graph call")
    args = parser.parse_args(argv)
    classes = json.loads(args.graph.with_suffix(".json").read_text())["classes"]
    out = csv.writer(sys.stdout)
    out.writerow(["path", "label", "confidence", *classes])
    for path, label, confidence, p in classify_folder(
        args.graph, args.folder, batch_size=args.batch_size
    ):
        out.writerow([str(path), label, f"{confidence:.6g}", *(f"{v:.6g}" for v in p)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
