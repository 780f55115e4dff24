"""The feature cache and atomic writes against damage, killed writers and a full disk.

The full-disk tests write into a real 256 KiB tmpfs (``full_disk``), which needs root
(or CAP_SYS_ADMIN); they are skipped where mounting is not permitted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline import atomic
from pipeline.errors import StorageError
from pipeline.features import cache
from tests.conftest import extracted

SETTINGS = {"sample_rate": 1000, "segment": {"length": 500}, "features": {"n_fft": 64}}


def dead_pid() -> int:
    """The process id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def temp_name(name: str, pid: int) -> str:
    """What :func:`atomic.temp_prefix` gives a writer with process id ``pid`` on this machine."""
    return f".{name}.{atomic.HOST}.{pid}.abc123_x.tmp"


# --- checksums -------------------------------------------------------------------------------


def test_an_entry_changed_in_place_is_computed_again_with_a_warning(tmp_path, files, caplog):
    root, ex, calls = tmp_path / "cache", extracted(), []

    def compute(_folder):
        calls.append(1)
        return ex, {}

    first = cache.cached(compute, root=root, files=files, settings=SETTINGS)
    meta = json.loads((root / first.key / "meta.json").read_text())
    assert set(meta["checksums"]) == set(cache.FILES) and calls == [1]
    assert cache.cached(compute, root=root, files=files, settings=SETTINGS).hit
    # The same shape and dtype, other values: the header and the size do not change.
    noise = np.random.default_rng(9).normal(size=ex.images.shape).astype(np.float32)
    np.save(root / first.key / "images.npy", noise)
    with caplog.at_level("WARNING", logger="pipeline.features.cache"):
        cached = cache.cached(compute, root=root, files=files, settings=SETTINGS)
    assert not cached.hit and calls == [1, 1]
    assert "is damaged (images.npy does not match the checksum" in caplog.text
    np.testing.assert_array_equal(cached.extracted.images, ex.images)
    assert cache.cached(compute, root=root, files=files, settings=SETTINGS).hit  # rewritten


def test_verify_false_skips_the_check(tmp_path, files):
    root, ex = tmp_path / "cache", extracted()
    key = cache.cached(lambda _folder: (ex, {}), root=root, files=files, settings=SETTINGS).key
    np.save(root / key / "start.npy", ex.start + 1)  # same shape, other values
    unchecked = cache.cached(None, root=root, files=files, settings=SETTINGS, verify=False)
    assert unchecked.hit and np.array_equal(unchecked.extracted.start, ex.start + 1)


def test_an_entry_without_checksums_is_not_trusted(tmp_path, files, caplog):
    root, ex = tmp_path / "cache", extracted()
    key = cache.cached(lambda _folder: (ex, {}), root=root, files=files, settings=SETTINGS).key
    meta = json.loads((root / key / "meta.json").read_text())
    del meta["checksums"]
    (root / key / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="pipeline.features.cache"):
        again = cache.cached(lambda _folder: (ex, {}), root=root, files=files, settings=SETTINGS)
    assert not again.hit and "is unreadable ('checksums')" in caplog.text


# --- stale temporaries -----------------------------------------------------------------------


def test_a_write_removes_a_dead_writers_and_an_old_temporary_and_keeps_a_live_ones(tmp_path):
    dead, old = temp_name("out.json", dead_pid()), ".out.json.otherhost.12.abc123_x.tmp"
    live, other = temp_name("out.json", os.getpid()), temp_name("out.json.bak", dead_pid())
    for name in (dead, old, live, other):
        (tmp_path / name).write_bytes(b"")
    then = time.time() - 2 * atomic.STALE_SECONDS
    os.utime(tmp_path / old, (then, then))
    os.utime(tmp_path / live, (then, then))  # old, but its writer runs
    atomic.write_json(tmp_path / "out.json", {"a": 1})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out.json", live, other])  # another destination's are not touched
    with atomic.atomic_path(tmp_path / "x") as tmp:
        assert tmp.name.startswith(f".x.{atomic.HOST}.{os.getpid()}.")
        tmp.write_text("x")


def test_the_cache_removes_stale_temporary_folders_and_counts_live_ones(tmp_path, files, caplog):
    root = tmp_path / "cache"
    ex = extracted(n=5, shape=(1, 64, 64))  # 80 kB of images
    dead = root / temp_name("f" * 64, dead_pid())
    old = root / ".other.tmp"  # no process id: by age
    live = root / temp_name("e" * 64, os.getpid())
    for folder in (dead, old, live):
        folder.mkdir(parents=True)
        np.save(folder / "images.npy", ex.images)
    then = time.time() - 2 * cache.STALE_SECONDS
    for path in (old, old / "images.npy"):
        os.utime(path, (then, then))
    with caplog.at_level("INFO", logger="pipeline.features.cache"):
        got = cache.cached(lambda _folder: (ex, {}), root=root, files=files, settings=SETTINGS)
    assert sorted(p.name for p in root.iterdir()) == sorted([got.key, live.name])
    assert caplog.text.count("left half-written by a run that ended") == 2
    # The live temporary counts toward the limit: with it the cache is over 1.5 entries.
    size = cache.entries(root)[0][1]
    assert cache.temporaries(root) == [(live, (live / "images.npy").stat().st_size)]
    other = {**SETTINGS, "n": 2}
    second = cache.cached(
        lambda _folder: (ex, {}), root=root, files=files, settings=other, max_bytes=int(2.5 * size)
    )
    assert {f.name for f, _, _ in cache.entries(root)} == {second.key}  # first evicted
    assert live.is_dir()


# --- a full disk -----------------------------------------------------------------------------


def test_writing_text_onto_a_full_disk_names_the_path_and_leaves_nothing(full_disk):
    path = full_disk / "report.md"
    with pytest.raises(StorageError, match=r"report\.md: cannot be written: the device is full"):
        atomic.write_text(path, "x" * 1_000_000)
    with pytest.raises(StorageError, match=r"metrics\.json: .*free space there or write to"):
        atomic.write_json(full_disk / "metrics.json", {"a": "x" * 1_000_000})
    assert list(full_disk.iterdir()) == []
    atomic.write_json(full_disk / "small.json", {"a": 1})  # a write that fits still works
    assert json.loads((full_disk / "small.json").read_text()) == {"a": 1}


def test_csvs_written_through_open_files_onto_a_full_disk_are_a_storage_error(full_disk):
    import csv
    from contextlib import ExitStack

    outputs = [full_disk / "predictions.csv", full_disk / "errors.csv"]  # as predict writes
    # A write's OSError names no file: the innermost output open when it came is named.
    full = pytest.raises(StorageError, match=r"tiny/errors\.csv: cannot be written: the device")
    with full, ExitStack() as stack:
        tmps = [stack.enter_context(atomic.atomic_path(o)) for o in outputs]
        handles = [stack.enter_context(open(t, "w", newline="")) for t in tmps]
        for i in range(20_000):
            csv.writer(handles[0]).writerow([f"file_{i:05d}.wav", "label", 0.5])
    assert list(full_disk.iterdir()) == []


def test_torch_save_onto_a_full_disk_is_a_storage_error(full_disk):
    path = full_disk / "checkpoint.pt"
    # torch.save to a path raises RuntimeError("... unexpected pos ..."), without an errno
    full = pytest.raises(StorageError, match=r"checkpoint\.pt: .*device is full")
    with full as info, atomic.atomic_path(path) as tmp:
        torch.save({"w": torch.zeros(1_000_000)}, tmp)
    assert isinstance(info.value, OSError) and info.value.errno == 28
    assert list(full_disk.iterdir()) == []
    # through a file object: the RuntimeError's context is OSError(ENOSPC)
    full = pytest.raises(StorageError, match=r"checkpoint\.pt: ")
    with full, atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"w": torch.zeros(1_000_000)}, f)
    assert list(full_disk.iterdir()) == []


def test_an_error_that_is_not_a_full_disk_is_left_alone(full_disk):
    with pytest.raises(OSError, match="requested and"):
        np.save(full_disk / "filler.npy", np.zeros(100_000, np.float32))  # fills the disk
    with pytest.raises(ValueError, match="a bug"), atomic.atomic_path(full_disk / "a"):
        raise ValueError("a bug")  # not a write failing, even on a full disk
    assert [p.name for p in full_disk.iterdir()] == ["filler.npy"]


def test_a_full_cache_carries_on_without_caching(full_disk, files, caplog):
    ex, folders = extracted(n=5, shape=(1, 128, 128)), []  # 320 kB: more than the disk holds

    def compute(folder):
        folders.append(folder)
        return ex, {"r": 1}

    with caplog.at_level("WARNING", logger="pipeline.features.cache"):
        got = cache.cached(compute, root=full_disk, files=files, settings=SETTINGS)
    assert got.key is None and not got.hit and got.info == {"r": 1}
    np.testing.assert_array_equal(got.extracted.images, ex.images)
    assert f"feature cache: {full_disk} is full (" in caplog.text
    # what was streamed into the entry went with it: computed again, in memory
    assert "computing the images again, held in memory" in caplog.text
    assert folders[0] is not None and folders[1:] == [None]
    assert list(full_disk.iterdir()) == []  # no partial temporary folder
