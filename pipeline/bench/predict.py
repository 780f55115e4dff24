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

- ``onnx``: the bundle exported as a waveform-in graph (``task=export``'s default) and run
  by the deployment example ``docs/examples/onnx_classify.py`` through onnxruntime on the
  CPU (read with soundfile, cut into windows, one graph call per batch, mean of the windows'
  probabilities; float32, no CSV written); ``--no-onnx`` leaves it out.

The ratio ``pipeline / bare`` shows what the pipeline's bookkeeping costs, ``onnx /
pipeline`` what the exported graph gives against ``task=predict`` in the same run.
``--adapt-bn`` also times ``predict.adapt_bn=group`` (a first pass that re-estimates the
network's batch-norm statistics per group, here grouped by the first digit of the
clip's number) against the plain ``pipeline`` run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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
from pipeline.models.base import wrap
from pipeline.models.resnet import build_resnet
from pipeline.runtime import autocast, precision, reading_workers, resolve_device
from pipeline.tasks.predict import predict_folder

RATE = 8000
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "onnx_classify.py"
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


def onnx_ready() -> bool:
    """Whether the exporter and onnxruntime import, and the deployment example is there."""
    found = [importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")]
    return all(found) and EXAMPLE.is_file()


def export_graph(bundle_path: Path, folder: Path) -> Path:
    """The bundle as a waveform-in graph with its sidecar, as ``task=export`` writes them."""
    from pipeline.onnx_frontend import waveform_classifier
    from pipeline.tasks.export import input_shape, onnx_program, sidecar

    bundle = load_bundle(bundle_path)
    model = wrap(bundle.model)
    shape = input_shape(bundle, model, "waveform")
    path = folder / "model.onnx"
    module = waveform_classifier(bundle, model.fitted.eval())
    onnx_program(module, shape, graph="waveform").save(str(path))
    meta = sidecar(bundle, model, "waveform", shape)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def onnx_example():
    """The deployment example's module, loaded from its file (it is no package module)."""
    spec = importlib.util.spec_from_file_location("onnx_classify", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    parser.add_argument("--no-onnx", action="store_true", help="leave out the ONNX graph")
    return parser


def measure(
    args: argparse.Namespace, *, device: torch.device, amp: bool, workers: int
) -> dict[str, list[float]]:
    """Seconds of each timed run over the same clips: ``pipeline`` (and ``adapt_bn``), ``bare``
    and ``onnx`` (where ``args.onnx``).

    Writes the clips and the bundle (and its graph) into a temporary folder, warms up,
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
        graph = export_graph(bundle_path, root) if args.onnx else None
        times = {name: [] for name in (*runs, "bare", *(["onnx"] if graph else []))}
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
            if graph is not None:
                times["onnx"].append(time_onnx(graph, root / "clips", args))
    return times


def time_onnx(graph: Path, clips: Path, args: argparse.Namespace) -> float:
    """Seconds the deployment example takes to classify ``clips`` with ``graph``."""
    example = onnx_example()
    t0 = time.perf_counter()
    rows = example.classify_folder(graph, clips, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    assert len(rows) == args.files
    return seconds


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    amp = not args.no_amp
    args.onnx = not args.no_onnx and onnx_ready()
    if not args.no_onnx and not args.onnx:
        print('onnx: not timed: needs the onnx extra (pip install -e ".[onnx]")')
    workers = reading_workers(
        args.workers if args.workers == "auto" else int(args.workers), key="--workers"
    )
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
    if "onnx" in rate:
        print(f"  ratio onnx/pipeline: {rate['onnx'] / rate['pipeline']:.2f}")
    return 0
