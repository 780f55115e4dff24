"""Training images per second of the pipeline's loop against a bare PyTorch loop, same process.

``python -m pipeline.bench train [--device auto] [--depth 20] [--images 2048]``
trains the same ResNet from the same initial weights on the same random images
(default 1x64x32, the default image size) for the same number of epochs with
both loops, alternating them over ``--repeats`` rounds after a warm-up, and
prints the best images per second of each and their ratio:

- ``pipeline``: :func:`pipeline.fit.fit` with its defaults (SGD, momentum 0.9,
  the learning-rate schedule, channels_last, AMP (CUDA, CPUs with bf16), per-epoch
  bookkeeping and an atomic checkpoint every epoch);
- ``bare``: the loop anyone would write: shuffle, slice, forward, cross-entropy,
  backward, step; with the same memory format and autocast so that only the
  loop differs.

On CUDA it also samples the GPU's utilisation with ``nvidia-smi`` while the
pipeline's loop runs.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.fit import TrainSettings, fit
from pipeline.models.resnet import build_resnet
from pipeline.runtime import autocast, precision, resolve_device


def bare_loop(model, x, y, *, epochs: int, batch_size: int, device, amp: bool, seed: int) -> None:
    """The minimal training loop on the same batches and memory format as the pipeline."""
    model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = x.to(device), y.to(device)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g).to(device)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            xb = x[idx].contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                loss = F.cross_entropy(model(xb), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GPUUtilisation:
    """Samples ``nvidia-smi``'s utilisation.gpu every 100 ms while in the ``with`` block."""

    def __init__(self, device: torch.device) -> None:
        self.on = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.index = device.index or 0
        self.samples: list[float] = []

    def __enter__(self) -> GPUUtilisation:
        if self.on:
            query = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
            self.proc = subprocess.Popen(
                ["nvidia-smi", f"--id={self.index}", *query], stdout=subprocess.PIPE, text=True
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.on:
            self.proc.terminate()
            out, _ = self.proc.communicate()
            self.samples = [float(v) for v in out.split() if v.strip().isdigit()]

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


class Workload:
    """The same random images, labels and initial weights for both loops.

    Args:
        args: the parsed command line.
        device: where both loops train.
        amp: whether both run under mixed precision.
    """

    def __init__(self, args: argparse.Namespace, *, device: torch.device, amp: bool) -> None:
        self.args, self.device, self.amp = args, device, amp
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(args.images, 1, *args.size, generator=g)  # (N, 1, H, W)
        self.y = torch.randint(0, 10, (args.images,), generator=g)  # (N,)
        self.init = build_resnet(num_classes=10, depth=args.depth).state_dict()
        # The loop alone, as the bare loop does it: no recomputed batch-norm statistics after it.
        self.settings = TrainSettings(
            epochs=args.epochs,
            batch_size=args.batch_size,
            amp=amp,
            compile=args.compile,
            precise_bn=False,
        )

    def fresh(self) -> torch.nn.Module:
        model = build_resnet(num_classes=10, depth=self.args.depth)
        model.load_state_dict(self.init)
        return model

    def run_bare(self, epochs: int, n: int) -> float:
        """Images per second of :func:`bare_loop` over the first ``n`` images."""
        model = self.fresh()
        if self.args.compile:
            model = torch.compile(model)
        _sync(self.device)
        t0 = time.perf_counter()
        bare_loop(
            model,
            self.x[:n],
            self.y[:n],
            epochs=epochs,
            batch_size=self.args.batch_size,
            device=self.device,
            amp=self.amp,
            seed=0,
        )
        _sync(self.device)
        return epochs * n / (time.perf_counter() - t0)

    def run_pipeline(self, tmp: Path, s: TrainSettings, n: int) -> float:
        """Images per second of :func:`pipeline.fit.fit` over the first ``n`` images."""
        _sync(self.device)
        t0 = time.perf_counter()
        fit(
            self.fresh(),
            self.x[:n],
            self.y[:n],
            self.x[:0],
            self.y[:0],
            settings=s,
            device=self.device,
            seed=0,
            progress=False,
            checkpoint=tmp / "last.pt",
        )
        _sync(self.device)
        return s.epochs * n / (time.perf_counter() - t0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--depth", type=int, default=20, help="CIFAR-form ResNet depth (6n+2)")
    parser.add_argument("--images", type=int, default=2048, help="training images per epoch")
    parser.add_argument("--size", type=int, nargs=2, default=[64, 32], metavar=("H", "W"))
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; best is kept")
    parser.add_argument("--compile", action="store_true", help="train.compile=true for both")
    parser.add_argument("--no-amp", action="store_true", help="turn mixed precision off")
    return parser


def measure(work: Workload) -> tuple[dict[str, list[float]], list[float]]:
    """Both loops' images per second over the rounds after a warm-up, and the GPU's utilisation.

    Returns:
        ``{"pipeline": [...], "bare": [...]}``, one rate per round, and the mean
        utilisation (%) of each round of the pipeline's loop (empty off CUDA).
    """
    args = work.args
    rates: dict[str, list[float]] = {"pipeline": [], "bare": []}
    utilisation = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        warm = replace(work.settings, epochs=1)
        work.run_pipeline(Path(tmp), warm, n=4 * args.batch_size)
        work.run_bare(1, 4 * args.batch_size)
        for _ in range(args.repeats):
            with GPUUtilisation(work.device) as gpu:
                rates["pipeline"].append(work.run_pipeline(Path(tmp), work.settings, args.images))
            if gpu.mean is not None:
                utilisation.append(gpu.mean)
            rates["bare"].append(work.run_bare(args.epochs, args.images))
    return rates, utilisation


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    amp = not args.no_amp
    rates, utilisation = measure(Workload(args, device=device, amp=amp))
    best = {k: max(v) for k, v in rates.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"train: ResNet-{args.depth}, {args.images} images {args.size[0]}x{args.size[1]}, "
        f"batch {args.batch_size}, {args.epochs} epochs per run, device {device} ({name}), "
        f"{torch.get_num_threads()} torch threads, {precision(device, amp)}, "
        f"compile={args.compile}, best of {args.repeats}"
    )
    for key, value in best.items():
        print(f"  {key:9s} {value:8.0f} images/s")
    print(f"  ratio pipeline/bare: {best['pipeline'] / best['bare']:.2f}")
    if utilisation:
        print(f"  GPU utilisation during the pipeline's loop: {max(utilisation):.0f} %")
    return 0
