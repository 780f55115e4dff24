"""A disk cache of extracted images, keyed by everything the images depend on.

An entry is a folder ``<root>/<key>/``::

    images.npy        float16 or float32 (n, channels, height, width), streamed in by the
                      extraction and read back by rows (:mod:`pipeline.features.store`)
    record.npy, start.npy, split.npy, file_samples.npy, file_rates.npy
    skipped.json      the files left out, with reasons
    meta.json         format version, key, what went into the key, the facts the
                      caller computed with the images (``info``) and the SHA-256 of
                      every other file (``checksums``); written last

The key is the SHA-256 of :data:`FORMAT_VERSION`, the versions of the libraries
that compute the images, every input file's identity (absolute path, size,
modification and status-change times in nanoseconds, inode) and the caller's
settings (read, segment and feature parameters). Settings may be given as
configured (``auto``, whole files) rather than resolved, as long as the resolution
depends on nothing else: the resolved values then travel in ``info``, and a hit needs
no file opened. An entry is written into a temporary folder beside it and renamed into place with
:func:`os.replace`, so an interrupted or concurrent run never leaves a half-written
entry under a key: a later run either finds the whole entry or none. Every file
is flushed to the device (:func:`os.fsync`), and the folder too, before the rename.
Caching is explicit: :func:`cached` logs a hit or a miss.

Opening an entry checks each file against its checksum (``verify``), so a file
changed in place after the entry was written (same size, other values) is a miss
with a warning, not a silent wrong result. Hashing streams each file once at about
2 GB/s (SHA-256 on a CPU with SHA extensions), and leaves the images in the page
cache for the run that reads them next; ``verify=False`` skips it. Entries of an
earlier format (without checksums) have other keys and are never opened.

The temporary folder is named ``.<key>.<host>.<pid>.<random>.tmp``
(:func:`pipeline.atomic.temp_prefix`). A run killed while writing cannot remove
its own, so each write removes every temporary folder whose writer has ended
(:func:`pipeline.atomic.is_stale`: a process of this machine that no longer runs,
or one untouched for an hour); the others count toward the size limit. When the
cache's device is full, :func:`cached` logs a warning and computes the images again, held
in memory, uncached (those streamed into the entry were lost with it).

A hit marks its entry as used (the mtime of its ``meta.json``); with a size limit
(``features.cache_max_gb``) a new entry evicts the least recently used others until
the cache fits, logging each one it removes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio

from pipeline import atomic
from pipeline.data.dataset import Skipped
from pipeline.errors import ConfigError, StorageError
from pipeline.features.extract import Extracted
from pipeline.features.store import ImageFile, ImageWriter

log = logging.getLogger(__name__)

# Raise when the images, or the values resolved from the same inputs and settings, change.
# 2: meta.json holds the checksum of every file. 3: images float16 or float32 (meta "dtype").
FORMAT_VERSION = 3
ARRAYS = ("record", "start", "split", "file_samples", "file_rates")
FILES = ("images.npy", *(f"{a}.npy" for a in ARRAYS), "skipped.json")  # checksummed
# Another machine's temporary folder untouched for this long belongs to a run that was killed.
STALE_SECONDS = atomic.STALE_SECONDS
CHUNK_BYTES = 1 << 22  # hashing reads this much at a time


@dataclass
class Lookup:
    """What :func:`cached` found or computed.

    Attributes:
        extracted: the images (on disk when cached) and their bookkeeping.
        info: JSON values computed with the images (resolved settings).
        key: the entry's key, None without a cache or when its device is full.
        hit: whether the images came from the cache.
    """

    extracted: Extracted
    info: dict
    key: str | None
    hit: bool


def file_identity(path: Path) -> list:
    """``[absolute path, size, mtime_ns, ctime_ns, inode]``: changes when the file is
    replaced, written or touched, also by a copy that keeps the modification time
    (``cp -p``, ``rsync -t``, ``touch -r``: the status-change time is not settable). A file
    gone since it was listed gets -1s (reading then skips it with its reason)."""
    try:
        st = os.stat(path)
    except OSError:
        return [os.path.abspath(path), -1, -1, -1, -1]
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def cache_key(*, files: Sequence[Path], settings: Mapping) -> str:
    """SHA-256 (hex) of the format version, library versions, file identities and settings.

    Args:
        files: the input files, in the order that gives the images' record indices.
        settings: JSON-serialisable read, segment and feature settings.
    """
    payload = {
        "format_version": FORMAT_VERSION,
        "versions": {"torch": torch.__version__, "torchaudio": torchaudio.__version__},
        "files": [file_identity(p) for p in files],
        "settings": settings,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def checksum(path: Path) -> str:
    """``sha256:<hex>`` of the file's bytes, read in chunks of :data:`CHUNK_BYTES`."""
    digest, buf = hashlib.sha256(), bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return f"sha256:{digest.hexdigest()}"


class _Mismatch(ValueError):
    """A file of an entry does not match the checksum written with it."""


def load_entry(root: Path, key: str, *, verify: bool = True) -> tuple[Extracted, dict] | None:
    """The entry under ``key`` (images read from disk by rows, :class:`ImageFile`) and its
    info, or None if there is none.

    An entry that exists but cannot be read (files removed or damaged by hand) is
    removed with a warning, so the caller recomputes it.

    Args:
        root: the cache folder.
        key: from :func:`cache_key`.
        verify: check every file against its checksum in ``meta.json`` (reads each
            file once, about 0.5 s per GB); a mismatch counts as damage.
    """
    folder = Path(root) / key
    if not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION or meta.get("key") != key:
            raise ValueError(f"meta.json describes another entry ({meta.get('key')})")
        images = ImageFile(folder / "images.npy")
        arrays = {a: np.load(folder / f"{a}.npy", allow_pickle=False) for a in ARRAYS}
        skipped = json.loads((folder / "skipped.json").read_text(encoding="utf-8"))
        if list(images.shape) != meta["shape"] or len(arrays["record"]) != len(images):
            raise ValueError(f"images {images.shape} do not match meta.json {meta['shape']}")
        if verify:
            _verify(folder, meta["checksums"])
    except _Mismatch as err:
        log.warning("feature cache entry %s is damaged (%s); computing it again", folder, err)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    except (OSError, ValueError, KeyError) as err:
        log.warning("feature cache entry %s is unreadable (%s); computing it again", folder, err)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    extracted = Extracted(
        images=images,
        **arrays,
        skipped=[Skipped(Path(s["path"]), s["reason"]) for s in skipped],
    )
    return extracted, meta.get("info", {})


def _verify(folder: Path, checksums: Mapping[str, str]) -> None:
    """Raise :class:`_Mismatch` naming the first file of :data:`FILES` that changed."""
    for name in FILES:
        if checksum(folder / name) != checksums[name]:
            raise _Mismatch(
                f"{name} does not match the checksum written with it: it was changed after "
                "the entry was written"
            )


def save_entry(
    root: Path, key: str, ex: Extracted, *, info: Mapping, describe: Mapping
) -> tuple[Extracted, dict]:
    """Write ``ex`` as the entry ``key`` (atomically) and return it read back from disk.

    Args:
        root: the cache folder.
        key: from :func:`cache_key`.
        ex: the images and their bookkeeping.
        info: JSON values to return with the images on a hit.
        describe: what went into the key, stored in ``meta.json`` for people.

    Raises:
        StorageError: the cache's device is full; nothing of the entry is left.
        OSError: the entry cannot be written for another reason.
    """
    with new_entry(root, key) as tmp:
        _write(tmp, key, ex, info=info, describe=describe)
    return _read_back(root, key)


def _read_back(root: Path, key: str) -> tuple[Extracted, dict]:
    loaded = load_entry(root, key, verify=False)  # just hashed while writing
    assert loaded is not None, f"feature cache entry {Path(root) / key} vanished after writing"
    return loaded


@contextlib.contextmanager
def new_entry(root: Path, key: str) -> Iterator[Path]:
    """A temporary folder beside the entry ``key``, renamed into place when the block ends
    without an exception (:func:`_rename`) and removed otherwise.

    Raises:
        StorageError: the cache's device filled up in the block; nothing of the entry is left.
    """
    root, tmp = Path(root), None
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        tmp = Path(tempfile.mkdtemp(prefix=atomic.temp_prefix(key), suffix=".tmp", dir=root))
        # mkdtemp's 0700 would hide the entry from other users
        tmp.chmod(0o777 & ~atomic.current_umask())
        yield tmp
        _rename(tmp, root, key)
    except Exception as err:
        full = atomic.storage_error(err, path=root / key, folder=root)
        if full is None or full is err:
            raise
        atomic.release(err)
        raise full from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _write(tmp: Path, key: str, ex: Extracted, *, info: Mapping, describe: Mapping) -> None:
    """Write the entry's files into ``tmp``, each flushed to the device, ``meta.json`` last;
    the images only if they are not already there (streamed by the extraction)."""
    images = ex.images
    if not (isinstance(images, ImageFile) and images.path == tmp / "images.npy"):
        with ImageWriter(tmp / "images.npy", _stored_dtype(images)) as writer:
            for i in range(0, len(images), 4096):
                writer.append(images[i : i + 4096])
            writer.close(tail=images.shape[1:])
    for a in ARRAYS:
        np.save(tmp / f"{a}.npy", getattr(ex, a), allow_pickle=False)
    skipped = [{"path": str(s.path), "reason": s.reason} for s in ex.skipped]
    (tmp / "skipped.json").write_text(json.dumps(skipped), encoding="utf-8")
    checksums = {}
    for name in FILES:
        checksums[name] = checksum(tmp / name)
        atomic.fsync(tmp / name)
    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "shape": list(images.shape),
        "dtype": str(_stored_dtype(images)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "info": dict(info),
        "checksums": checksums,
        **describe,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    atomic.fsync(tmp / "meta.json")
    atomic.fsync(tmp)


def _stored_dtype(images) -> np.dtype:
    """float16 images stay float16; anything else is stored as float32."""
    return np.dtype(np.float16 if images.dtype == np.float16 else np.float32)


def _rename(tmp: Path, root: Path, key: str) -> None:
    """Rename the finished ``tmp`` to ``root / key``, unless another run's copy is there."""
    try:
        os.replace(tmp, root / key)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        # A concurrent run renamed its own copy of the same entry into place first.
        log.info("feature cache entry %s was written by another run meanwhile", key)
        return
    atomic.fsync(root)


def temporaries(root: Path) -> list[tuple[Path, int]]:
    """Every temporary folder under ``root`` (being written, or left by a killed run).

    Returns:
        (folder, bytes) pairs.
    """
    out = []
    for folder in Path(root).iterdir() if Path(root).is_dir() else []:
        if not (folder.name.startswith(".") and folder.name.endswith(".tmp")):
            continue
        with contextlib.suppress(OSError):  # removed meanwhile by its run
            if folder.is_dir() and not folder.is_symlink():
                out.append((folder, _size(folder)))
    return out


def remove_stale(root: Path) -> int:
    """Remove the temporary folders under ``root`` whose writer has ended, with a log line each.

    Returns:
        The bytes freed.
    """
    freed, now = 0, time.time()
    for folder, size in temporaries(root):
        if atomic.is_stale(folder, now=now):
            shutil.rmtree(folder, ignore_errors=True)
            freed += size
            log.info(
                "feature cache: removed %s (%.1f MB), left half-written by a run that ended",
                folder,
                size / 1e6,
            )
    return freed


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def entries(root: Path) -> list[tuple[Path, int, float]]:
    """Every finished entry under ``root``: (folder, bytes, last used), oldest use first."""
    out = []
    for folder in Path(root).iterdir() if Path(root).is_dir() else []:
        meta = folder / "meta.json"
        if folder.name.startswith(".") or not meta.is_file():
            continue
        try:
            size = _size(folder)
            out.append((folder, size, meta.stat().st_mtime))
        except OSError:  # removed meanwhile by another run
            continue
    return sorted(out, key=lambda e: e[2])


def prune(root: Path, *, max_bytes: int, keep: str | None = None) -> list[Path]:
    """Remove the least recently used entries until the cache holds at most ``max_bytes``.

    ``keep`` (the entry a run is using) is never removed, even when it alone is larger.
    On POSIX a run still reading a removed entry keeps its open images file.
    Temporary folders count too: stale ones are removed first, and those still being
    written are never removed.

    Returns:
        The folders removed.
    """
    remove_stale(root)
    found = entries(root)
    total = sum(size for _, size, _ in found) + sum(size for _, size in temporaries(root))
    removed = []
    for folder, size, _ in found:
        if total <= max_bytes:
            break
        if folder.name == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        removed.append(folder)
        log.info(
            "feature cache over %.2f GB: removed the least recently used entry %s (%.1f MB)",
            max_bytes / 1e9,
            folder,
            size / 1e6,
        )
    return removed


def cached(
    compute: Callable[[Path | None], tuple[Extracted, dict]],
    *,
    root: Path | None,
    files: Sequence[Path],
    settings: Mapping,
    max_bytes: int | None = None,
    verify: bool = True,
) -> Lookup:
    """``compute()``'s images and info, from the cache under ``root`` when an entry exists.

    Args:
        compute: ``compute(folder)`` extracts the images (reading every file) and returns
            them with a JSON-serialisable info dict; called only on a miss. ``folder`` is
            the new entry's temporary folder, where it may stream the images (as
            ``images.npy``, an :class:`~pipeline.features.store.ImageWriter`), or None
            (no cache, or a full one): then it returns them in memory.
        root: the cache folder, or None to compute without caching.
        files: the input files, in record order.
        settings: everything else the images depend on (JSON-serialisable).
        max_bytes: after writing a new entry, evict the least recently used others
            until the cache holds at most this much; None for no limit.
        verify: check a found entry's files against their checksums (see
            :func:`load_entry`); a changed file makes the lookup a miss.

    Raises:
        ConfigError: ``root`` is not a folder, or the entry cannot be written there.
    """
    if root is None:
        return Lookup(*compute(None), key=None, hit=False)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(
            f"features.cache_dir={str(root)!r} is a file, not a folder; point it at a folder "
            "or set features.cache=false"
        )
    key = cache_key(files=files, settings=settings)
    found = load_entry(root, key, verify=verify)
    if found is not None:
        log.info("feature cache hit %s (%s)", key, root / key)
        with contextlib.suppress(OSError):  # a read-only cache still serves hits
            os.utime(root / key / "meta.json")  # most recently used
        return Lookup(*found, key=key, hit=True)
    log.info("feature cache miss %s: computing the images", key)
    describe = {"n_files": len(files), "settings": dict(settings)}
    try:
        return _fill(compute, root=root, key=key, describe=describe, max_bytes=max_bytes)
    except StorageError as err:
        log.warning(
            "feature cache: %s is full (%s); computing the images again, held in memory",
            root,
            err,
        )
        return Lookup(*compute(None), key=None, hit=False)
    except OSError as err:
        raise ConfigError(
            f"features.cache_dir={str(root)!r} cannot be written ({err.strerror or err}); point "
            "it at a writable folder or set features.cache=false"
        ) from err


def _fill(compute, *, root: Path, key: str, describe: Mapping, max_bytes: int | None) -> Lookup:
    """A miss: the entry computed into its temporary folder, renamed into place, read back;
    then the cache pruned to ``max_bytes``."""
    with new_entry(root, key) as tmp:
        ex, info = compute(tmp)
        _write(tmp, key, ex, info=info, describe=describe)
    saved = _read_back(root, key)
    log.info("feature cache entry %s written (%.1f MB)", key, _size(root / key) / 1e6)
    if max_bytes is not None:
        prune(root, max_bytes=max_bytes, keep=key)
    return Lookup(*saved, key=key, hit=False)
