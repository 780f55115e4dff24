"""Files per second of ``task=predict`` against a bare read-STFT-forward loop, same process.

``python -m pipeline.bench predict [--files 2000] [--device auto]`` writes
FSDD-like clips (1 s of 16-bit WAV at 8 kHz, ten class folders) to a temporary
folder, saves an untrained ResNet-20 bundle with the default image settings
(throughput does not depend on the weights), then times, on the same files:

- ``pipeline``: :func:`pipeline.tasks.predict.predict_folder`, the code behind
  ``task=predict`` (walk, read, segment, STFT, normalise, classify, aggregate,
  write the CSVs atomically);
- ``bare``: the least a hand-written script would do: read each file with
  soundfile, stack batches, STFT, normalise, forward, argmax, no output;
  in the same precision (mixed where it pays, as ``predict.amp``; ``--no-amp``: float32).

The ratio ``pipeline / bare`` shows what the pipeline's bookkeeping costs.
``--adapt-bn`` also times ``predict.adapt_bn=group`` (a first pass that re-estimates the
network's batch-norm statistics per group, here grouped by the first digit of the
clip's number) against the plain ``pipeline`` run.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from pipeline.bundle import load_bundle, save_bundle
from pipeline.features.stft import Normalizer, STFTImage, STFTParams, compute_images
from pipeline.frontend import Frontend
from pipeline.models.resnet import build_resnet
from pipeline.runtime import autocast, precision, resolve_device
from pipeline.tasks.predict import predict_folder, reading_workers

RATE = 8000
N_CLASSES = 10
# The image settings of conf/features/stft.yaml, written out.
PARAMS = {
    "n_fft": 256,
    "hop_length": 128,
    "win_length": 256,
    "window": "hann",
    "center": True,
    "pad_mode": "reflect",
    "power": 2,
    "scale": "db",
    "top_db": 80.0,
    "size": (64, 32),
}


def write_clips(root: Path, n: int, *, seed: int = 0) -> list[Path]:
    """``n`` one-second 16-bit WAV clips at 8 kHz: a tone per class plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(RATE) / RATE
    paths = []
    for i in range(n):
        label = i % N_CLASSES
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        x = 0.3 * np.sin(2 * np.pi * (200 + 300 * label) * t) + 0.05 * rng.standard_normal(RATE)
        path = folder / f"{label}_clip_{i}.wav"
        sf.write(path, x.astype(np.float32), RATE, subtype="PCM_16")
        paths.append(path)
    return paths


def make_bundle(folder: Path, clips: list[Path]) -> Path:
    """An untrained ResNet-20 bundle whose normaliser is fitted on a few clips."""
    params = STFTParams(**PARAMS)
    x = np.stack([sf.read(p, dtype="float32")[0][None] for p in clips[:64]])
    normalizer = Normalizer.fit(compute_images(x, params, progress=False), mode="global")
    data = {
        "sample_rate": RATE,
        "channels": "mix",
        "segment_samples": RATE,
        "hop_samples": RATE,
        "pad": True,
    }
    model = build_resnet(num_classes=N_CLASSES, in_channels=1, depth=20)
    return save_bundle(
        folder,
        model,
        classes=[str(c) for c in range(N_CLASSES)],
        frontend=Frontend.from_settings(data, params, normalizer),
    )


@torch.no_grad()
def bare_loop(
    bundle_path: Path, clips: list[Path], *, device, batch_size: int, amp: bool = True
) -> int:
    """Read, STFT, normalise and classify ``clips`` with no bookkeeping; returns files done."""
    bundle = load_bundle(bundle_path)
    front = STFTImage(bundle.features).to(device)
    model = bundle.model.to(device, memory_format=torch.channels_last).eval()
    mean = torch.as_tensor(bundle.normalizer.mean, device=device)
    std = torch.as_tensor(bundle.normalizer.std, device=device)
    done = 0
    for i in range(0, len(clips), batch_size):
        x = np.stack([sf.read(p, dtype="float32")[0][None] for p in clips[i : i + batch_size]])
        images = (front(torch.from_numpy(x).to(device)) - mean) / std
        with autocast(device, amp):
            logits = model(images.contiguous(memory_format=torch.channels_last))
        done += int(logits.argmax(1).numel())
    return done


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--files", type=int, default=2000, help="clips to classify")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch-size", type=int, default=256, help="segments per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--workers", default="auto", help="predict.workers: auto or a count")
    parser.add_argument("--adapt-bn", action="store_true", help="also time predict.adapt_bn=group")
    parser.add_argument("--no-amp", action="store_true", help="float32: predict.amp=false")
    return parser


def measure(
    args: argparse.Namespace, *, device: torch.device, amp: bool, workers: int
) -> dict[str, list[float]]:
    """Seconds of each timed run over the same clips: ``pipeline`` (and ``adapt_bn``), ``bare``.

    Writes the clips and the bundle into a temporary folder, warms both paths up,
    then alternates them ``args.repeats`` times.
    """
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        root = Path(tmp)
        clips = write_clips(root / "clips", args.files)
        bundle_path = make_bundle(root / "bundle", clips)
        bundle = load_bundle(bundle_path)
        # Warm up both paths (allocator, oneDNN kernels) on a few files.
        bare_loop(bundle_path, clips[:32], device=device, batch_size=args.batch_size, amp=amp)
        runs = {"pipeline": {}}
        if args.adapt_bn:  # 7_clip_123.wav -> group "1"
            runs["adapt_bn"] = {"adapt_bn": True, "group_pattern": re.compile(r"_clip_(\d)")}
        times = {name: [] for name in (*runs, "bare")}
        for r in range(args.repeats):
            for name, extra in runs.items():
                outputs = [root / f"{name}{r}.csv", root / f"{name}{r}_errors.csv"]
                t0 = time.perf_counter()
                summary = predict_folder(
                    bundle,
                    root / "clips",
                    outputs=outputs,
                    device=device,
                    batch_size=args.batch_size,
                    top_k=3,
                    rule="mean",
                    progress=False,
                    workers=workers,
                    amp=amp,
                    **extra,
                )
                times[name].append(time.perf_counter() - t0)
                assert summary["classified"] == args.files, summary
            t0 = time.perf_counter()
            done = bare_loop(bundle_path, clips, device=device, batch_size=args.batch_size, amp=amp)
            times["bare"].append(time.perf_counter() - t0)
            assert done == args.files
    return times


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    amp = not args.no_amp
    workers = reading_workers(args.workers if args.workers == "auto" else int(args.workers))
    times = measure(args, device=device, amp=amp, workers=workers)
    rate = {k: args.files / min(v) for k, v in times.items()}
    print(
        f"predict: {args.files} clips (1 s, 8 kHz, 16-bit WAV), ResNet-20, images "
        f"{PARAMS['size'][0]}x{PARAMS['size'][1]}, device {device} ({precision(device, amp)}), "
        f"{torch.get_num_threads()} torch threads, {workers} reading processes, "
        f"best of {args.repeats}"
    )
    for name, value in rate.items():
        print(f"  {name:9s} {value:8.0f} files/s")
    print(f"  ratio pipeline/bare: {rate['pipeline'] / rate['bare']:.2f}")
    if args.adapt_bn:
        print(f"  ratio adapt_bn/pipeline: {rate['adapt_bn'] / rate['pipeline']:.2f}")
    return 0
