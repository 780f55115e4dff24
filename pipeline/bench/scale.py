"""Peak memory and speed of the main job as its dataset grows tenfold, in child processes.

``python -m pipeline.bench scale [--windows 20000] [--factor 10] [--out outputs/bench-scale]``
writes two datasets of ``--windows`` and ``--windows * --factor`` one-second windows under
``<out>/data/<size>/<class>/<n>.wav``: 4 classes of noisy tones (300, 600, 900 and 1200 Hz,
each file a little off its class's pitch, at its own noise level), 16-bit WAV at 4 kHz,
``--file-seconds`` long (written ten seconds at a time: the parent's memory stays small).
A dataset whose marker (``<root>/.scale.json``, naming the parameters) matches is reused.
Each is run through ``python -m pipeline.run data=folder ... models=[resnet]`` in a child
process: 1 s windows (64 x 32 images), a random split by file, ``--epochs`` passes over the
training windows (``train.min_steps=0``), its own feature cache under ``<out>/cache/`` and
run folder under ``<out>/runs/``. Its peak resident memory (``ru_maxrss``, Linux) comes from
``os.wait4``; ``anon MB`` is the peak of its anonymous memory (``RssAnon`` in
``/proc/<pid>/status``, sampled every 0.2 s), since ``ru_maxrss`` also counts the pages of
a memory-mapped file the job has read, which the kernel can drop under pressure.

Every run starts with its cache folder emptied, so that it extracts the images (a miss):
``extract files/s`` is the data's files over the extraction's seconds. ``train img/s`` is the
mean of the training history's ``images_per_second`` (the first epoch left out when there
are more). Both, the cache's bytes and its dtype come from the run's ``metrics.json``
(``dataset.features`` where the job writes it; else the feature seconds and the cache entry's
folder, or the ``images ... computed in X s`` line of ``run.log``). ``--hit`` runs each again
on its cache: the loading path's memory and speed, for one more training per run.

Where ``conf/features/<group>.yaml`` has ``in_memory:``, the small job runs twice,
``features.in_memory=false`` (streamed) and ``=true`` (in memory), and the ratio of their
training images/s is checked against the target (streamed >= 0.9 x in memory); the large job
is streamed. Without the key every run takes the job's only path (``current``). The growth
of peak RSS from the small to the large job is checked against the target (< 500 MB).

``--memory-limit 4G`` also runs the large job (a miss) in a cgroup v1 memory cgroup of that
limit, made under this process's own and removed afterwards; the job's child process joins it
before it starts the job, and the line says whether the job finished or the OOM killer ended
it, its cgroup's peak usage (page cache included) and whether its images are larger than the
limit (else the limit does not test streaming). Where cgroup v1 memory is not writable it
says so and skips. Extra arguments are Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline import atomic
from pipeline.bench.longfile import REPO

RATE = 4000
CLASSES = {"tone_0300hz": 300.0, "tone_0600hz": 600.0, "tone_0900hz": 900.0, "tone_1200hz": 1200.0}
CHUNK_SECONDS = 10
MARKER = ".scale.json"  # a hidden file: the folder reader skips it
RSS_GROWTH_MB = 500
THROUGHPUT_RATIO = 0.9
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
MB = 2**20


def write_dataset(root: Path, *, windows: int, file_seconds: int, seed: int = 0) -> dict:
    """``windows`` one-second windows of noisy tones as ``<root>/<class>/<n>.wav``.

    Files of ``file_seconds`` (the last one shorter when they do not divide ``windows``)
    go to the classes in turn, at :data:`RATE`, 16-bit PCM.

    Returns:
        The marker: the parameters, ``files``, and ``reused`` (true when ``root``'s marker
        named the same parameters and nothing was written).

    Raises:
        ValueError: fewer than 4 files a class, too few for a train/val/test split by file.
    """
    n_files = math.ceil(windows / file_seconds)
    if n_files < 4 * len(CLASSES):
        raise ValueError(
            f"windows={windows} in files of file_seconds={file_seconds} gives {n_files} files, "
            f"fewer than 4 for each of the {len(CLASSES)} classes; lower --file-seconds"
        )
    marker = {
        "windows": windows,
        "file_seconds": file_seconds,
        "sample_rate": RATE,
        "classes": CLASSES,
        "seed": seed,
        "files": n_files,
    }
    with contextlib.suppress(OSError, ValueError):
        if json.loads((root / MARKER).read_text()) == marker:
            return {**marker, "reused": True}
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    names = list(CLASSES)
    for i in range(n_files):
        name = names[i % len(names)]
        (root / name).mkdir(parents=True, exist_ok=True)
        seconds = min(file_seconds, windows - i * file_seconds)
        pitch = CLASSES[name] * (1 + rng.uniform(-0.03, 0.03))
        write_tone(root / name / f"{i:06d}.wav", pitch=pitch, seconds=seconds, rng=rng)
    atomic.write_json(root / MARKER, marker)  # last: an interrupted write is done again
    return {**marker, "reused": False}


def write_tone(path: Path, *, pitch: float, seconds: int, rng: np.random.Generator) -> None:
    """A 16-bit WAV at :data:`RATE`: a tone of ``pitch`` Hz, slowly modulated, in noise."""
    n, step = seconds * RATE, CHUNK_SECONDS * RATE
    noise, phase = rng.uniform(0.05, 0.2), rng.uniform(0, 2 * np.pi)
    with sf.SoundFile(path, "w", RATE, 1, subtype="PCM_16") as f:
        for a in range(0, n, step):  # a chunk at a time: the parent's memory stays small
            t = np.arange(a, min(n, a + step)) / RATE
            envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 0.2 * t + phase)
            x = 0.3 * envelope * np.sin(2 * np.pi * pitch * t)
            f.write((x + noise * rng.standard_normal(t.size)).astype(np.float32))


def has_in_memory(group_file: Path) -> bool:
    """Whether a features config file (``conf/features/stft.yaml``) has an ``in_memory`` key."""
    return bool(re.search(r"^in_memory\s*:", group_file.read_text(), flags=re.M))


def features_group(overrides: list[str]) -> str:
    """The features config group the runs take: ``features=<name>`` among the overrides, or stft."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("features=")]
    return chosen[-1] if chosen else "stft"


def anon_mb(pid: int) -> float | None:
    """A process's anonymous resident memory (``RssAnon``, MB), None where it cannot be read."""
    with contextlib.suppress(OSError):
        found = re.search(r"^RssAnon:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
        return int(found.group(1)) / 1024 if found else None
    return None


def run_job(overrides: list[str], *, cgroup: Path | None = None, every: float = 0.2) -> dict:
    """``python -m pipeline.run <overrides> progress=false`` in a child process, measured.

    :func:`pipeline.bench.longfile.peak_rss` with two additions: the child can be born in
    ``cgroup`` (it writes its pid to the cgroup's ``cgroup.procs`` before it starts the job;
    this process stays out, so the OOM killer has only the job to choose), and its
    anonymous memory is sampled every ``every`` seconds while it runs.

    Returns:
        ``mb`` (peak resident MB, ``ru_maxrss``), ``anon_mb`` (the peak sample),
        ``seconds``, ``exit`` (the exit status; negative: killed by that signal), ``stderr``.
    """

    def join() -> None:  # in the child, between fork and exec
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    t0, peak = time.perf_counter(), None
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty job cannot block
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.run", *overrides, "progress=false"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=join if cgroup is not None else None,
        )
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            sample = anon_mb(proc.pid)
            peak = peak if sample is None else max(peak or 0.0, sample)
            time.sleep(every)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return {
            "mb": usage.ru_maxrss / 1024,  # kilobytes on Linux
            "anon_mb": peak,
            "seconds": time.perf_counter() - t0,
            "exit": proc.returncode,
            "stderr": err.read().decode(errors="replace"),
        }


def own_memory_cgroup() -> Path | None:
    """This process's cgroup v1 memory cgroup folder, or None where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                folder = CGROUP_V1 / path.lstrip("/")
                return folder if (folder / "cgroup.procs").is_file() else None
    return None


@contextlib.contextmanager
def memory_cgroup(limit: str) -> Iterator[Path | None]:
    """A cgroup v1 memory cgroup limited to ``limit`` (``4G``), under this process's own.

    Removed on leaving the block. Yields None, with a printed note, where cgroup v1 memory
    is not mounted or not writable.
    """
    home = own_memory_cgroup()
    if home is None:
        print(f"note: no cgroup v1 memory hierarchy at {CGROUP_V1}; no run under --memory-limit")
        yield None
        return
    group = home / f"bench-scale-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(limit)
    except OSError as err:
        print(f"note: cannot make a memory cgroup in {home} ({err}); no run under --memory-limit")
        with contextlib.suppress(OSError):
            group.rmdir()
        yield None
        return
    try:
        yield group
    finally:
        try:
            group.rmdir()
        except OSError as err:
            print(f"note: could not remove the cgroup {group} ({err}); rmdir it")


def cgroup_facts(group: Path) -> dict:
    """The limit, the peak usage (MB, page cache included) and the OOM kills of a cgroup."""
    oom = re.search(r"^oom_kill (\d+)", (group / "memory.oom_control").read_text(), flags=re.M)
    return {
        "limit_mb": int((group / "memory.limit_in_bytes").read_text()) / MB,
        "usage_mb": int((group / "memory.max_usage_in_bytes").read_text()) / MB,
        "oom_kills": int(oom.group(1)) if oom else None,
    }


def job_overrides(
    root: Path, *, cache: Path, run_dir: Path, epochs: int, device: str, in_memory: bool | None
) -> list[str]:
    """The main job on a dataset of :func:`write_dataset`, ResNet only, split by file."""
    return [
        "data=folder",
        f"data.root={root}",
        f"data.sample_rate={RATE}",
        "data.segment.length_seconds=1",
        "data.split=random",  # by file: a file's windows all go to one split
        "models=[resnet]",
        f"train.epochs={epochs}",
        "train.min_steps=0",  # the same passes over the data at both sizes
        f"features.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        f"device={device}",
        *([] if in_memory is None else [f"features.in_memory={str(in_memory).lower()}"]),
    ]


def folder_bytes(folder: Path | None) -> int | None:
    """The bytes of the files directly in ``folder`` (a cache entry), None where it is not one."""
    if folder is None or not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def stored_dtype(folder: Path | None) -> str | None:
    """The dtype of a cache entry's ``images.npy``, read from its header."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        return np.load(folder / "images.npy", mmap_mode="r").dtype.name
    return None


def logged_seconds(run_dir: Path) -> float | None:
    """The feature seconds from the ``images (1, 64, 32) computed in 3.21 s`` line of run.log."""
    with contextlib.suppress(OSError):
        text = (run_dir / "run.log").read_text(errors="replace")
        found = re.findall(r"images \(.*\) (?:computed|loaded from .*) in ([\d.]+) s", text)
        return float(found[-1]) if found else None
    return None


class JobFailed(RuntimeError):
    """A run of the job ended with a non-zero exit status (``exit``; negative: a signal)."""

    def __init__(self, message: str, *, exit: int) -> None:
        super().__init__(message)
        self.exit = exit


def log_tail(path: Path, chars: int = 2000) -> str:
    """The end of a run's log, for a failure's message."""
    try:
        return f"{path} ends:\n{path.read_text(errors='replace')[-chars:]}"
    except OSError:
        return f"{path} was not written"


def read_run(run_dir: Path, *, cache: Path) -> dict:
    """What a finished run's ``metrics.json`` says of its data, features and training.

    ``dataset.features`` (seconds, files_per_second, cache_bytes, dtype, in_memory) is
    taken where the job writes it; else the figures are measured from the run's outputs.
    """
    m = json.loads((run_dir / "metrics.json").read_text())
    d, feats = m["dataset"], m.get("features", {})
    given = {k: v for k, v in (d.get("features") or {}).items() if v is not None}
    seconds = given.get("seconds", feats.get("seconds"))
    seconds = logged_seconds(run_dir) if seconds is None else seconds
    hit = bool(feats.get("cache_hit"))
    files_per_second = given.get("files_per_second")
    if files_per_second is None and seconds:
        files_per_second = d["n_files"] / seconds
    entry = cache / feats["cache_key"] if feats.get("cache_key") else None
    history = next(iter(m.get("histories", {}).values()), [])
    rates = [row["images_per_second"] for row in history]
    rates = rates[1:] or rates  # the first epoch also warms up, where there are more
    return {
        "windows": d["n_train"] + d["n_val"] + d["n_test"],
        "files": d["n_files"],
        "hit": hit,
        "feature_seconds": seconds,
        "files_per_second": None if hit else files_per_second,
        "cache_bytes": given.get("cache_bytes", folder_bytes(entry)),
        "dtype": given.get("dtype") or stored_dtype(entry),
        "in_memory": given.get("in_memory"),
        "image_shape": feats.get("image_shape"),
        "images_per_second": float(np.mean(rates)) if rates else None,
    }


def measure(
    root: Path,
    *,
    out: Path,
    label: str,
    way: str,
    hit: bool,
    args: argparse.Namespace,
    cgroup: Path | None = None,
) -> dict:
    """Run the job once in a child process; its memory, time and :func:`read_run` figures.

    Without ``hit`` the run's cache folder is emptied first, so that it extracts the images.
    """
    cache = out / "cache" / label
    run_dir = out / "runs" / (f"{label}-hit" if hit else label)
    if not hit:
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    in_memory = {"streamed": False, "in-memory": True}.get(way)
    overrides = job_overrides(
        root,
        cache=cache,
        run_dir=run_dir,
        epochs=args.epochs,
        device=args.device,
        in_memory=in_memory,
    )
    ran = run_job([*overrides, *args.overrides], cgroup=cgroup)
    if ran["exit"] != 0:  # the job logs its error to run.log; stdout is dropped
        raise JobFailed(
            f"{label}: the job exited with status {ran['exit']}: {ran['stderr'][-2000:]}\n"
            + log_tail(run_dir / "run.log"),
            exit=ran["exit"],
        )
    row = {"label": label, "way": way, **{k: ran[k] for k in ("mb", "anon_mb", "seconds")}}
    row.update(read_run(run_dir, cache=cache))
    row["hit"] = hit or row["hit"]
    return row


def measure_limited(root: Path, *, out: Path, way: str, args: argparse.Namespace) -> dict | None:
    """The large job (a miss) under ``--memory-limit``; None where no cgroup can be made."""
    with memory_cgroup(args.memory_limit) as group:
        if group is None:
            return None
        label = f"large-{way}-limited"
        try:
            row = measure(root, out=out, label=label, way=way, hit=False, args=args, cgroup=group)
            row["outcome"] = "finished"
        except JobFailed as err:
            if err.exit != -signal.SIGKILL or cgroup_facts(group)["oom_kills"] == 0:
                raise  # (an older kernel does not count the kills: None)
            row = {"label": label, "outcome": "killed by the OOM killer"}
        return {**row, **cgroup_facts(group)}


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_rows(rows: list[dict]) -> None:
    """One line per run: windows, memory, time, cache and the two rates."""
    print(
        f"{'run':<24}{'windows':>9}{'files':>7}{'peak RSS MB':>13}{'anon MB':>9}{'wall s':>9}"
        f"{'cache MB':>10}  {'dtype':<8}{'extract files/s':>16}{'train img/s':>13}"
    )
    for r in rows:
        name = r["label"] + (" (hit)" if r.get("hit") else "")
        cache = None if r.get("cache_bytes") is None else r["cache_bytes"] / MB
        print(
            f"{name:<24}{_cell(r.get('windows'), 'd'):>9}{_cell(r.get('files'), 'd'):>7}"
            f"{_cell(r.get('mb'), '.0f'):>13}{_cell(r.get('anon_mb'), '.0f'):>9}"
            f"{_cell(r.get('seconds'), '.1f'):>9}{_cell(cache, '.1f'):>10}  "
            f"{r.get('dtype') or '-':<8}{_cell(r.get('files_per_second'), '.1f'):>16}"
            f"{_cell(r.get('images_per_second'), '.0f'):>13}"
        )


def _find(rows: list[dict], label: str, *, hit: bool = False) -> dict | None:
    return next((r for r in rows if r["label"] == label and r.get("hit", False) == hit), None)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def verdicts(rows: list[dict], *, way: str, factor: float) -> list[str]:
    """The targets of issue 27, checked on the miss runs (and the hit runs, where made)."""
    lines = []
    streamed, in_memory = _find(rows, "small-streamed"), _find(rows, "small-in-memory")
    if streamed and in_memory:
        lines.append(
            f"peak RSS at the small size: streamed {streamed['mb']:.0f} MB, "
            f"in memory {in_memory['mb']:.0f} MB"
        )
        ratio = streamed["images_per_second"] / in_memory["images_per_second"]
        lines.append(
            f"training images/s at the small size, streamed / in memory: {ratio:.2f} "
            f"(target >= {THROUGHPUT_RATIO}): {_verdict(ratio >= THROUGHPUT_RATIO)}"
        )
    for hit in (False, True):
        small, large = _find(rows, f"small-{way}", hit=hit), _find(rows, f"large-{way}", hit=hit)
        if small and large:
            growth = large["mb"] - small["mb"]
            anon = ""
            if small["anon_mb"] is not None and large["anon_mb"] is not None:
                anon = f"; anonymous memory +{large['anon_mb'] - small['anon_mb']:.0f} MB"
            lines.append(
                f"peak RSS, small -> large ({factor:g}x the windows), {way}"
                f"{' (hit)' if hit else ''}: {small['mb']:.0f} -> {large['mb']:.0f} MB, "
                f"{growth:+.0f} MB{anon} (target < {RSS_GROWTH_MB} MB): "
                f"{_verdict(growth < RSS_GROWTH_MB)}"
            )
    return lines


def describe_limited(row: dict, *, large: dict | None) -> str:
    """One sentence on the run under the memory limit."""
    text = (
        f"{row['label']} under a {row['limit_mb']:.0f} MB limit: {row['outcome']}, "
        f"cgroup peak {row['usage_mb']:.0f} MB (page cache included)"
    )
    cache = (large or {}).get("cache_bytes")
    if cache is not None:
        text += f"; its images ({cache / MB:.0f} MB) are " + (
            "larger than the limit"
            if cache / MB > row["limit_mb"]
            else "within the limit: it does not test streaming"
        )
    return text


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--windows", type=_positive, default=20000, help="small dataset's windows")
    parser.add_argument("--factor", type=float, default=10, help="the large one, in small ones")
    parser.add_argument("--file-seconds", type=_positive, default=100, help="seconds of each file")
    parser.add_argument("--epochs", type=_positive, default=1, help="train.epochs of every run")
    parser.add_argument("--device", default="cpu", help="device of every run (cpu, cuda, auto)")
    parser.add_argument(
        "--out", default="outputs/bench-scale", help="folder for the data, caches and runs"
    )
    parser.add_argument("--hit", action="store_true", help="also run each again on its cache")
    parser.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="also run the large job in a cgroup v1 memory cgroup of SIZE (e.g. 4G, 512M)",
    )
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    return parser


def _datasets(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """Write (or reuse) both datasets; one line each."""
    roots = {}
    for size, windows in (("small", args.windows), ("large", round(args.windows * args.factor))):
        roots[size] = out / "data" / size
        t0 = time.perf_counter()
        m = write_dataset(roots[size], windows=windows, file_seconds=args.file_seconds)
        how = "reused" if m["reused"] else f"written in {time.perf_counter() - t0:.0f} s"
        print(
            f"{size}: {windows} windows of 1 s, {m['files']} files of {args.file_seconds} s at "
            f"{RATE} Hz, {len(CLASSES)} classes, in {roots[size]} ({how})",
            flush=True,
        )
    return roots


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.memory_limit and not re.fullmatch(r"\d+[KMGkmg]?", args.memory_limit):
        parser.error(f"--memory-limit={args.memory_limit!r} must be a size such as 4G or 512M")
    if not args.factor > 1:
        parser.error(f"--factor={args.factor:g} must be above 1: the large dataset is larger")
    out = Path(args.out).resolve()  # the jobs run in the repository
    try:
        roots = _datasets(args, out)
    except ValueError as err:
        parser.error(str(err))
    group = features_group(args.overrides)
    conf = REPO / "conf" / "features" / f"{group}.yaml"
    ways = ["streamed", "in-memory"] if conf.is_file() and has_in_memory(conf) else []
    if not ways:
        print(
            f"note: conf/features/{group}.yaml has no in_memory key yet: every run takes the "
            "job's only path (current), and streamed and in-memory are not compared"
        )
    ways = ways or ["current"]
    try:
        rows = run_all(roots, out=out, ways=ways, args=args)
        limited = None
        if args.memory_limit:
            limited = measure_limited(roots["large"], out=out, way=ways[0], args=args)
    except JobFailed as err:
        print(err, file=sys.stderr)
        return 1
    return report(rows, limited, way=ways[0], args=args)


def run_all(
    roots: dict[str, Path], *, out: Path, ways: list[str], args: argparse.Namespace
) -> list[dict]:
    """The small job each way, then the large one the first way; each again with ``--hit``."""
    rows = []
    for size, way in [("small", w) for w in ways] + [("large", ways[0])]:
        for hit in (False, True) if args.hit else (False,):
            label = f"{size}-{way}"
            rows.append(measure(roots[size], out=out, label=label, way=way, hit=hit, args=args))
            print(f"  ran {label}{' (hit)' if hit else ''}: {rows[-1]['mb']:.0f} MB", flush=True)
    return rows


def report(rows: list[dict], limited: dict | None, *, way: str, args: argparse.Namespace) -> int:
    """Print the table, the window counts and the verdicts; 1 where a count is off."""
    shape = " x ".join(str(n) for n in rows[0].get("image_shape") or ["?"])
    print(f"device {args.device}, {args.epochs} epoch(s), models=[resnet], images {shape}")
    print_rows(rows + ([limited] if limited and "windows" in limited else []))
    wanted = {"small": args.windows, "large": round(args.windows * args.factor)}
    status = 0
    for r in rows:
        if r["hit"]:  # the same data as its miss
            continue
        asked = wanted[r["label"].split("-")[0]]
        off = "" if abs(r["windows"] - asked) <= 0.01 * asked else ": OFF"
        held = "" if r["in_memory"] is None else f"; in_memory={str(r['in_memory']).lower()}"
        print(f"{r['label']}: asked for {asked} windows, the job cut {r['windows']}{off}{held}")
        status = status or int(bool(off))
    for line in verdicts(rows, way=way, factor=args.factor):
        print(line)
    if limited:
        print(describe_limited(limited, large=_find(rows, f"large-{way}")))
    return status
