"""A generated task of short multichannel sensor traces whose class is a known frequency.

``python -m pipeline.bench traces --root DIR`` writes it; the development suite
(``python -m pipeline.bench suite``) uses it as its short-signal, several-channel case.

Each trace is 128 samples at 100 Hz on 3 channels, saved as a ``.npy`` array
(channels, samples) under ``<root>/<class>/``. The class is the frequency of a tone
burst (5, 10, 15 or 20 Hz) that lasts 40-100 % of the trace, starts at a random time and
appears on one random channel. Every channel also carries white noise, a weaker distractor
tone at a random frequency between the class frequencies, a random offset and a slow drift,
so no level, channel or time identifies a class: only the burst's frequency does. Knowing
the four frequencies, the largest periodogram value at them names the class of each of 400
traces drawn with seed 0 (an oracle the models do not have).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline import atomic

CLASS_HZ = (5.0, 10.0, 15.0, 20.0)
SAMPLE_RATE = 100
SAMPLES = 128
CHANNELS = 3


def trace(label: int, rng: np.random.Generator) -> np.ndarray:
    """One trace of class ``label`` (an index into :data:`CLASS_HZ`): (channels, samples)."""
    t = np.arange(SAMPLES) / SAMPLE_RATE
    x = 0.5 * rng.standard_normal((CHANNELS, SAMPLES))
    x += rng.uniform(-2, 2, (CHANNELS, 1)) + rng.uniform(-1, 1, (CHANNELS, 1)) * t / t[-1]
    for c in range(CHANNELS):  # a distractor between the class frequencies, on every channel
        hz = rng.choice(CLASS_HZ) + 2.5 * rng.choice((-1, 1))
        x[c] += 0.4 * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))
    length = int(rng.uniform(0.4, 1.0) * SAMPLES)
    start = int(rng.integers(0, SAMPLES - length + 1))
    burst = np.zeros(SAMPLES)
    burst[start : start + length] = np.hanning(length)
    hz = CLASS_HZ[label] * rng.uniform(0.97, 1.03)
    x[rng.integers(CHANNELS)] += 1.4 * burst * np.sin(2 * np.pi * hz * t + rng.uniform(0, 6.3))
    return x.astype(np.float32)


def write_traces(root: Path, *, n_per_class: int = 100, seed: int = 0) -> Path:
    """Write ``n_per_class`` traces of each class under ``root/<hz>hz/`` (atomically)."""
    rng = np.random.default_rng(seed)
    for label, hz in enumerate(CLASS_HZ):
        folder = root / f"{hz:g}hz"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            with atomic.atomic_path(folder / f"trace_{i:03d}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, trace(label, rng))
    return root


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench traces", description=__doc__)
    parser.add_argument("--root", required=True, help="folder to write the traces into")
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_traces(Path(args.root), n_per_class=args.n_per_class, seed=args.seed)
    print(f"wrote {len(CLASS_HZ) * args.n_per_class} traces into {args.root}")
    return 0
