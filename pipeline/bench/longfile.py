"""Peak memory of ``task=predict`` on one long recording, at two lengths, in child processes.

``python -m pipeline.bench longfile [--minutes 10] [--factor 10] [--source-rate 16000]``
writes two 16-bit WAV recordings of ``--minutes`` and ``--minutes * --factor`` minutes at
``--source-rate`` (a tone that changes every 30 s, plus noise; written a minute at a time),
saves an untrained ResNet-20 bundle at 8 kHz with 1 s windows (the bundle of ``python -m
pipeline.bench predict``: memory does not depend on the weights; a recording at another
rate is resampled), and runs ``python -m pipeline.run task=predict`` on each in a child
process, reading its peak resident memory (``ru_maxrss``, Linux) from ``os.wait4``.

``--reference`` also runs each with ``predict.batch_size`` above the recording's window
count: its file is then read whole and classified in one batch, which is what predict did
for every file before long files were read in blocks (:mod:`pipeline.blocks`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.bench.predict import RATE, make_bundle, write_clips

REPO = Path(__file__).resolve().parents[2]


def write_recording(path: Path, *, minutes: float, rate: int, seed: int = 0) -> Path:
    """A 16-bit WAV of ``minutes`` at ``rate``: a tone whose pitch changes every 30 s."""
    rng = np.random.default_rng(seed)
    n = round(minutes * 60 * rate)
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_16") as f:
        for a in range(0, n, 60 * rate):  # a minute at a time: the parent's memory stays small
            t = np.arange(a, min(n, a + 60 * rate)) / rate
            pitch = 200 + 300 * ((t // 30) % 10)
            x = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.05 * rng.standard_normal(t.size)
            f.write(x.astype(np.float32))
    return path


def peak_rss(*overrides: str) -> tuple[float, float]:
    """(peak resident MB, seconds) of ``python -m pipeline.run <overrides>``, a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", *overrides, "progress=false"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"predict failed: {err[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0  # kilobytes on Linux


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench longfile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=10, help="the shorter recording")
    parser.add_argument("--factor", type=float, default=10, help="the longer one, in shorter ones")
    parser.add_argument("--source-rate", type=int, default=16000, help="the recordings' rate")
    parser.add_argument("--batch-size", type=int, default=256, help="predict.batch_size")
    parser.add_argument("--reference", action="store_true", help="also read each file whole")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-longfile-") as tmp:
        root = Path(tmp)
        bundle = make_bundle(root / "bundle", write_clips(root / "clips", 64))
        for minutes in (args.minutes, args.minutes * args.factor):
            path = write_recording(
                root / f"rec_{minutes:g}min.wav", minutes=minutes, rate=args.source_rate
            )
            windows = round(minutes * 60)  # 1 s windows, no overlap
            ways = {"blocks": args.batch_size}
            if args.reference:
                ways["whole"] = windows + 1
            for way, batch in ways.items():
                mb, seconds = peak_rss(
                    "task=predict",
                    f"predict.model={bundle}",
                    f"predict.input={path}",
                    f"predict.output={root / f'{path.stem}_{way}.csv'}",
                    f"predict.batch_size={batch}",
                    "device=cpu",
                    f"hydra.run.dir={root / 'h' / f'{path.stem}_{way}'}",
                )
                rows.append((way, minutes, windows, mb, seconds))
    print(f"recordings at {args.source_rate} Hz, 16-bit, read at {RATE} Hz; 1 s windows")
    print(f"{'read':<7}{'minutes':>8}{'windows':>9}{'peak RSS MB':>13}{'seconds':>9}")
    for way, minutes, windows, mb, seconds in rows:
        print(f"{way:<7}{minutes:>8g}{windows:>9}{mb:>13.0f}{seconds:>9.1f}")
    for way in dict.fromkeys(r[0] for r in rows):
        short, long = (r[3] for r in rows if r[0] == way)
        print(f"{way}: {args.factor:g}x longer: peak RSS grows by {long - short:.0f} MB")
    return 0
