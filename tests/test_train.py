"""The training engine end to end: interrupted and resumed runs, and torchrun with DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def overrides(tmp: Path, run: str, *extra: str) -> list[str]:
    return [
        f"data.root={tmp / 'synthetic'}",
        "data.generate.n_per_class=20",
        "models=[resnet]",
        "train.epochs=8",
        "train.min_steps=0",
        "train.batch_size=16",
        "features.size=[32,16]",
        "progress=false",
        f"hydra.run.dir={tmp / run}",
        *extra,
    ]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    # With a weight average, whose state must survive the kill too.
    ema = "train.ema_epochs=2"
    reference = run_cli(*overrides(tmp_path, "reference", ema))
    assert reference.returncode == 0, reference.stdout + reference.stderr

    checkpoint = tmp_path / "interrupted" / "checkpoints" / "resnet.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", *overrides(tmp_path, "interrupted", ema)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no handler, no clean-up, as in a crash or a pre-empted job
    assert proc.wait() == -9, "the run ended before it could be interrupted"
    killed_after = torch.load(checkpoint, weights_only=True)["epoch"]
    assert killed_after < 8

    resumed = run_cli(*overrides(tmp_path, "interrupted", ema, "train.resume=true"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {checkpoint} after epoch {killed_after}" in resumed.stdout

    ref = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    got = json.loads((tmp_path / "interrupted" / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "confusion", "best_epoch"):
        assert got["models"]["resnet"][key] == ref["models"]["resnet"][key], key
    losses = [[h["train_loss"], h["val_loss"]] for h in ref["histories"]["resnet"]]
    assert [[h["train_loss"], h["val_loss"]] for h in got["histories"]["resnet"]] == losses
    a = torch.load(tmp_path / "reference" / "models" / "resnet" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "interrupted" / "models" / "resnet" / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
def test_torchrun_trains_with_ddp_on_two_cpu_processes(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "pipeline.run",
            *overrides(
                tmp_path,
                "ddp",
                "models=[resnet,svm]",
                "train.epochs=2",
                "train.min_steps=0",
                "device=cpu",
                "svm.C=[1.0]",
                "svm.gamma=[scale]",
                "svm.cv=2",
            ),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (tmp_path / "ddp" / "run.log").read_text()
    assert "distributed: rank 0 of 2 on cpu" in log and "distributed: rank 1 of 2 on cpu" in log
    assert proc.stdout.count("report: ") == 1  # rank 0 alone reports and writes
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"resnet", "svm"}
    assert len(metrics["histories"]["resnet"]) == 2
    assert sorted(p.name for p in (tmp_path / "ddp" / "models").iterdir()) == ["resnet", "svm"]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from Linux's /proc (torchrun starts its ranks in their
    own sessions, so killing its process group misses them)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parent.items() if p in frontier]
        found += children
        frontier = children
    return found


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="finds torchrun's ranks in /proc")
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
def test_a_killed_torchrun_resumes_every_ranks_augmentation(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"

    def launch(run: str, *extra: str) -> list[str]:
        # Each rank masks its own images: its random draws must resume where they stopped.
        settings = [
            "train.epochs=4",
            "train.min_steps=0",
            "device=cpu",
            "train.augment.freq_mask=4",
            "train.augment.time_mask=4",
            *extra,
        ]
        return [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "pipeline.run",
            *overrides(tmp_path, run, *settings),
        ]

    reference = subprocess.run(
        launch("reference"), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert reference.returncode == 0, reference.stdout + reference.stderr
    checkpoint = tmp_path / "interrupted" / "checkpoints" / "resnet.pt"
    proc = subprocess.Popen(
        launch("interrupted"), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in [*descendants(proc.pid), proc.pid]:  # both ranks and torchrun, as a pre-emption
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] < 4, "the run ended before it could be interrupted"
    assert len(saved["rng"]) == 2 and not torch.equal(
        saved["rng"][0]["torch"], saved["rng"][1]["torch"]
    )

    resumed = subprocess.run(
        launch("interrupted", "train.resume=true"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {checkpoint} after epoch {saved['epoch']}" in resumed.stdout
    ref = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    got = json.loads((tmp_path / "interrupted" / "metrics.json").read_text())
    assert [h["train_loss"] for h in got["histories"]["resnet"]] == [
        h["train_loss"] for h in ref["histories"]["resnet"]
    ]
    a = torch.load(tmp_path / "reference" / "models" / "resnet" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "interrupted" / "models" / "resnet" / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
