"""Images on disk: one ``.npy`` file written a batch at a time and read back by rows.

:class:`ImageWriter` appends each batch of images to the file as it is computed, so no
more than a batch is ever held; the header (with the final row count) is written last,
into space reserved for it at the start (:data:`HEADER_BYTES`), so the file is a plain
``.npy`` that :func:`numpy.load` opens too.

:class:`ImageFile` reads the rows a batch needs with :func:`os.preadv`, one read per run
of consecutive rows. Nothing is memory-mapped: the pages read stay in the kernel's page
cache, which the kernel reclaims under memory pressure (a memory cgroup's too), and do not
count in the process's resident memory as a memory map's pages would. A batch of 128
random rows of a 64 x 32 float16 image takes 128 reads of 4 KiB, about 0.3 ms from the
page cache, against tens of milliseconds for the training step they feed.

Images are stored as float16 or float32 (:func:`storage_dtype`): float16 halves the file
and keeps about three significant digits (a relative error of at most 2**-11), which
log-compressed images (dB, log1p) never notice; power and magnitude images, whose values
span many decades below float16's smallest normal number (6e-5), stay float32.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError
from pipeline.features.stft import AUTO, IMAGE_DTYPES

HEADER_BYTES = 256  # reserved for the .npy header: magic, version, length, dict, padding
DTYPES = (AUTO, *IMAGE_DTYPES)  # features.dtype: auto resolves to one of the image dtypes
LOG_SCALES = ("db", "log1p")  # bounded, log-compressed values: float16 holds them


def storage_dtype(setting: str, *, scale: str) -> np.dtype:
    """The images' dtype for ``features.dtype`` (auto: float16 for log-compressed images,
    float32 for power and magnitude): what the cache stores and every image is rounded to
    (:class:`~pipeline.features.stft.STFTParams` ``dtype``).

    Raises:
        ConfigError: ``setting`` is not one of :data:`DTYPES`.
    """
    if setting not in DTYPES:
        raise ConfigError(
            f"dtype={setting!r} must be auto (float16 for scale=db or log1p, "
            "else float32), float16 or float32",
            keys=("dtype",),
        )
    if setting == AUTO:
        setting = "float16" if scale in LOG_SCALES else "float32"
    return np.dtype(setting)


def _header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """A version 1.0 ``.npy`` header of exactly :data:`HEADER_BYTES` bytes."""
    descr = np.lib.format.dtype_to_descr(dtype)
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    body = text.ljust(HEADER_BYTES - 10 - 1) + "\n"  # 10: magic, version, length
    if len(body) + 10 != HEADER_BYTES:
        raise ValueError(f"shape {shape} does not fit a {HEADER_BYTES}-byte header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


class ImageWriter:
    """Appends images (n, channels, height, width) to a ``.npy`` file in ``dtype``.

    Use as a context manager, or call :meth:`close`; the file is complete only then.
    """

    def __init__(self, path: str | os.PathLike, dtype: np.dtype | str = "float32") -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.n = 0
        self.tail: tuple[int, ...] | None = None
        self._f = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._f.write(b"\0" * HEADER_BYTES)

    def append(self, images: np.ndarray) -> None:
        """Write a batch of images after the others.

        Raises:
            ConfigError: float16 cannot hold a value of the batch (above 65504).
            ValueError: the batch's image shape is not the first batch's.
        """
        images = np.asarray(images)
        if self.tail is None:
            self.tail = tuple(images.shape[1:])
        elif tuple(images.shape[1:]) != self.tail:
            raise ValueError(f"images {images.shape[1:]} after images {self.tail}")
        with np.errstate(over="ignore"):  # checked next
            stored = np.ascontiguousarray(images, dtype=self.dtype)
        if self.dtype == np.float16 and not np.isfinite(stored).all():
            raise ConfigError(
                f"features.dtype=float16 cannot hold image values up to "
                f"{float(np.abs(images).max()):.3g} (float16 ends at 65504); set "
                "features.dtype=float32 or auto",
                keys=("features.dtype",),
            )
        self._f.write(stored.data)
        self.n += len(images)

    def close(self, tail: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """Write the header and flush the file to the device; returns the array's shape.

        ``tail`` is the image shape when no batch was appended.
        """
        if self._f.closed:
            return (self.n, *(self.tail or ()))
        self.tail = self.tail if self.tail is not None else tuple(tail or ())
        shape = (self.n, *self.tail)
        self._f.seek(0)
        self._f.write(_header(shape, self.dtype))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return shape

    def abort(self) -> None:
        """Close without a header (the file is left for its folder's owner to remove)."""
        self._f.close()

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class ImageFile:
    """A ``.npy`` file of images read by rows, without memory-mapping (see the module).

    Indexing (an int, a slice, an integer or boolean array) returns float32 images, as an
    in-memory float32 array would; :meth:`rows` returns them in the stored dtype.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version != (1, 0):
                raise ValueError(f"{self.path} is a .npy file of version {version}, not 1.0")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            self.offset = f.tell()
        if fortran or dtype not in (np.float16, np.float32):
            raise ValueError(f"{self.path} holds {dtype} {'F' if fortran else 'C'}-order images")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        size = self.offset + self.shape[0] * self.row_bytes
        if os.path.getsize(self.path) < size:
            raise ValueError(f"{self.path} is shorter than its {self.shape} images")
        # Open now: a run still reading an entry that another run removes keeps its file.
        self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the images as stored."""
        return self.shape[0] * self.row_bytes

    def _descriptor(self) -> int:
        """The file's descriptor in this process (a forked child opens its own)."""
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (integers, any order, repeats allowed) in the stored dtype."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(index) and (index.min() < -n or index.max() >= n):
            raise IndexError(f"row index out of range for {n} images")
        index = np.where(index < 0, index + n, index)
        out = np.empty((len(index), *self.shape[1:]), dtype=self.dtype)
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        for run in np.split(np.arange(len(index)), breaks):
            if not len(run):
                continue
            first, count = int(ordered[run[0]]), len(run)
            if (order[run] == np.arange(run[0], run[0] + count)).all():
                self._read(first, out[run[0] : run[0] + count])  # already in place
            else:
                block = np.empty((count, *self.shape[1:]), dtype=self.dtype)
                self._read(first, block)
                out[order[run]] = block
        return out

    def _read(self, first: int, into: np.ndarray) -> None:
        """Read ``len(into)`` rows from row ``first`` into the contiguous array ``into``."""
        view = memoryview(into.reshape(-1).view(np.uint8))
        at, fd = self.offset + first * self.row_bytes, self._descriptor()
        while len(view):
            got = os.preadv(fd, [view], at)
            if got == 0:
                raise OSError(f"{self.path} ended before row {first + len(into)}")
            view, at = view[got:], at + got

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):  # images[rows, channel, ...]
            return self[key[0]][(slice(None), *key[1:])]
        if isinstance(key, (int, np.integer)):
            return self.rows(np.array([key]))[0].astype(np.float32)
        if isinstance(key, slice):
            index = np.arange(*key.indices(len(self)))
        else:
            index = np.asarray(key)
            if index.dtype == bool:
                index = np.flatnonzero(index)
        return self.rows(index).astype(np.float32, copy=False)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def chunks(self, index: np.ndarray | None = None, size: int = 4096) -> Iterator[np.ndarray]:
        """float32 images of rows ``index`` (all rows for None), ``size`` rows at a time."""
        index = np.arange(len(self)) if index is None else np.asarray(index)
        for i in range(0, len(index), size):
            yield self[index[i : i + size]]
