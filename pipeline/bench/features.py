"""Signals per second of the STFT front end against librosa and scipy, and of the feature cache.

``python -m pipeline.bench features [--n 3000] [--length 8000] [--device cpu]`` times,
in one process on the same random float32 signals, the magnitude STFT
(``n_fft=256``, ``hop_length=64``, periodic Hann window of 256, centred frames with
reflect padding) computed by:

- ``ours``: :func:`pipeline.features.stft.compute_images` (torchaudio, batched);
- ``librosa``: ``np.abs(librosa.stft(x))`` on the 2-D array (one call);
- ``scipy``: ``np.abs(scipy.signal.stft(x))`` on the reflect-padded 2-D array along
  the last axis (one call; ``boundary=None`` so the frames are the centred ones, and
  unscaled to match); it was faster here than ``ShortTimeFFT``, whose output is
  float64 whatever the input.

It checks the three agree to 1e-4 of the peak, prints each rate (best of
``--repeats``) and the ratio of ours to the faster reference. Then the cache: it
writes ``--files`` one-second WAV clips at 8 kHz and times ``task=compare``'s data
preparation with an empty cache (a miss that writes the entry) and again (a hit,
timed until every image has been read), and prints the ratios for the feature
stage and for the whole preparation (listing and splitting the files included).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import librosa
import numpy as np
import scipy.signal
import soundfile as sf
import torch

from pipeline.features.stft import STFTParams, compute_images
from pipeline.runtime import resolve_device

RATE = 8000


def best_of(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """The shortest of ``repeats`` timings of ``fn`` (after one warm-up call), and its result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def references(
    x: np.ndarray, *, n_fft: int, hop_length: int
) -> dict[str, Callable[[], np.ndarray]]:
    """librosa's and scipy's magnitude STFT of (n, samples) ``x``, as ours computes it."""
    window = scipy.signal.get_window("hann", n_fft, fftbins=True).astype(np.float32)

    def with_librosa() -> np.ndarray:
        return np.abs(
            librosa.stft(
                x,
                n_fft=n_fft,
                hop_length=hop_length,
                win_length=n_fft,
                window="hann",
                center=True,
                pad_mode="reflect",
            )
        )

    def with_scipy() -> np.ndarray:
        padded = np.pad(x, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
        _, _, z = scipy.signal.stft(
            padded,
            window=window,
            nperseg=n_fft,
            noverlap=n_fft - hop_length,
            nfft=n_fft,
            detrend=False,
            return_onesided=True,
            boundary=None,
            padded=False,
            axis=-1,
            scaling="spectrum",
        )
        return np.abs(z) * window.sum()  # undo scaling="spectrum" (1 / sum(window))

    return {"librosa": with_librosa, "scipy": with_scipy}


def bench_stft(args: argparse.Namespace, device: torch.device) -> None:
    """Time ours, librosa and scipy on the same signals and print the rates and the ratio."""
    x = np.random.default_rng(0).standard_normal((args.n, args.length), dtype=np.float32)
    params = STFTParams(
        n_fft=args.n_fft,
        hop_length=args.hop_length,
        win_length=args.n_fft,
        window="hann",
        center=True,
        pad_mode="reflect",
        power=1,
        scale="magnitude",
        top_db=None,
        size=None,
    )
    x3 = x[:, None]  # (n, channels=1, samples)
    methods = {
        "ours": lambda: compute_images(
            x3, params, device=device, batch_size=args.batch_size, progress=False
        )[:, 0],
        **references(x, n_fft=args.n_fft, hop_length=args.hop_length),
    }
    seconds, results = {}, {}
    for name, fn in methods.items():
        seconds[name], results[name] = best_of(fn, args.repeats)
    peak = float(results["librosa"].max())
    diffs = {
        k: float(np.abs(results[k] - results["librosa"]).max()) / peak for k in ("ours", "scipy")
    }
    for name, diff in diffs.items():
        assert diff < 1e-4, f"{name} differs from librosa by {diff:.2g} of the peak"
    rate = {k: args.n / v for k, v in seconds.items()}
    print(
        f"stft: {args.n} signals x {args.length} samples, n_fft={args.n_fft}, "
        f"hop_length={args.hop_length}, hann, centred (reflect), magnitude, float32; "
        f"ours on {device}, {torch.get_num_threads()} torch threads; best of {args.repeats}"
    )
    for name, value in rate.items():
        print(f"  {name:8s} {value:10.0f} signals/s  ({seconds[name]:.3f} s)")
    faster = max(("librosa", "scipy"), key=rate.get)
    print(
        f"  max difference to librosa, of the peak: ours {diffs['ours']:.1e}, "
        f"scipy {diffs['scipy']:.1e}"
    )
    print(f"  ratio ours/{faster} (the faster reference): {rate['ours'] / rate[faster]:.2f}")


def write_clips(root: Path, n: int) -> None:
    """``n`` one-second float WAV clips at 8 kHz in two class folders."""
    rng = np.random.default_rng(1)
    t = np.arange(RATE) / RATE
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        x = 0.3 * np.sin(2 * np.pi * (300 + 500 * (i % 2)) * t) + 0.1 * rng.standard_normal(RATE)
        sf.write(folder / f"clip{i:05d}.wav", x.astype(np.float32), RATE, subtype="FLOAT")


def bench_cache(args: argparse.Namespace, device: torch.device) -> None:
    """Time task=compare's data preparation with an empty feature cache and with a filled one.

    The feature stage is what the run reports as ``features.seconds`` (cache lookup,
    and on a miss probing, reading, windowing, STFT and writing the entry) plus
    reading every image once, so a memory-mapped hit is not flattered; the whole
    preparation adds listing the files and splitting them.
    """
    from hydra import compose, initialize_config_dir

    from pipeline.run import CONF
    from pipeline.tasks.compare import prepare_data

    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        root = Path(tmp)
        write_clips(root / "clips", args.files)
        overrides = [
            "data=folder",
            f"data.root={root / 'clips'}",
            f"data.sample_rate={RATE}",
            f"features.cache_dir={root / 'cache'}",
            f"features.batch_size={args.batch_size}",
        ]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        stage, whole = {}, {}
        for name in ("first", "hit"):
            t0 = time.perf_counter()
            data = prepare_data(cfg, device=device, progress=False)
            t1 = time.perf_counter()
            total = float(np.asarray(data.extracted.images, dtype=np.float64).sum())  # read all
            read_all = time.perf_counter() - t1
            stage[name], whole[name] = data.seconds + read_all, time.perf_counter() - t0
            assert data.cache_hit == (name == "hit") and np.isfinite(total)
        shape = data.extracted.images.shape
    print(
        f"cache: task=compare's data preparation on {args.files} WAV clips (1 s at 8 kHz), "
        f"default features, images {tuple(shape[1:])}"
    )
    print("                          feature stage   whole preparation")
    for name, label in (("first", "first run (miss, writes)"), ("hit", "second run (hit)")):
        print(f"  {label:24s} {stage[name]:10.4f} s {whole[name]:14.4f} s")
    print(f"  ratio first/hit (feature stage): {stage['first'] / stage['hit']:.1f}")
    print(f"  ratio first/hit (whole preparation): {whole['first'] / whole['hit']:.1f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench features",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=3000, help="signals")
    parser.add_argument("--length", type=int, default=8000, help="samples per signal")
    parser.add_argument("--n-fft", type=int, default=256)
    parser.add_argument("--hop-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256, help="features.batch_size")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many timings")
    parser.add_argument("--files", type=int, default=1000, help="clips for the cache timing")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    bench_stft(args, device)
    if args.files:
        bench_cache(args, device)
    return 0
