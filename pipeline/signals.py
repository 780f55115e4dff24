r"""Read one signal file of any supported format into a :class:`Signal`.

Every reader returns float32 samples of shape (channels, samples) and a sample
rate. Files with no intrinsic rate (NumPy arrays) take the rate the caller
gives; audio files at another rate are resampled with scipy's polyphase
filter. Every failure is a :class:`SignalError` naming the file and the fix.

A ``.mat`` file's variable is chosen by ``mat_key``, a regular expression that
must match exactly one variable name (``re.search``, e.g. ``DE_time``). A key
of the form ``<regex>.<field>[.<field>...]`` (``bearing.gs``, ``a.b.c``) is a
field path: the part before the first dot is the regex, matching exactly one
struct variable, and each later part an exact field name (a letter, then
letters, digits or ``_``). MATLAB names hold no dots, so in the regex part
write ``\w`` where "any character" is meant; a key whose dots are not followed
by a field name (``X.*``) stays a plain regex. v7.3 (HDF5) files are read the
same way, a struct being a group of datasets.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import scipy.io
import scipy.signal
import soundfile as sf
from scipy.io.matlab import mat_struct

from pipeline.errors import ConfigError, SignalError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
ARRAY_SUFFIXES = (".npy", ".npz")
TEXT_SUFFIXES = (".csv", ".txt")
MAT_SUFFIXES = (".mat",)
SUFFIXES = AUDIO_SUFFIXES + ARRAY_SUFFIXES + TEXT_SUFFIXES + MAT_SUFFIXES
CHANNEL_AXES = ("auto", "first", "last")

# ``data.mat_key`` as a field path: a regex over variable names (any characters but
# an unescaped dot, which a MATLAB name never holds), then one or more ``.field``
# parts, each a MATLAB field name (a letter, then letters, digits or underscores).
_FIELD_PATH = re.compile(r"(?P<variable>(?:[^.\\]|\\.)+)(?P<fields>(?:\.[A-Za-z]\w*)+)")


@dataclass(frozen=True)
class Signal:
    """A multi-channel signal.

    Attributes:
        samples: float32 array of shape (channels, samples).
        sample_rate: samples per second after any resampling.
        source_rate: the file's own rate (equal to ``sample_rate`` when not resampled).
    """

    samples: np.ndarray
    sample_rate: int
    source_rate: int

    @property
    def resampled(self) -> bool:
        return self.sample_rate != self.source_rate

    @property
    def duration_seconds(self) -> float:
        return self.samples.shape[-1] / self.sample_rate


def read_signal(
    path: str | Path,
    *,
    sample_rate: int,
    channels: str | list[int] = "mix",
    mat_key: str | None = None,
    npz_key: str | None = None,
    csv_columns: list[int | str] | None = None,
    channel_axis: str = "auto",
) -> Signal:
    """Read ``path`` and return it at ``sample_rate`` with the chosen channels.

    Channels are mixed in float64; the float32 result is checked to be finite.

    Args:
        path: a file with one of :data:`SUFFIXES`.
        sample_rate: the rate the pipeline works at; audio at another rate is
            resampled, files with no rate of their own (arrays, text, MATLAB)
            are taken to be at this rate.
        channels: ``"mix"`` averages all channels into one, ``"all"`` keeps
            them, a list of indices keeps those channels in that order.
        mat_key: regular expression that must match exactly one variable name
            of a ``.mat`` file, or a field path ``<regex>.<field>...`` (see the
            module docstring); None takes the only numeric variable.
        npz_key: the array of a ``.npz`` file; None takes the only array.
        csv_columns: columns of a ``.csv``/``.txt`` file, by index or header
            name; None takes every column.
        channel_axis: which axis of a 2-D ``.npy``/``.npz``/``.mat`` array
            holds the channels: ``first`` (rows are channels: (channels, samples)),
            ``last`` (columns are channels: (samples, channels)) or ``auto``: the
            shorter axis, since a recording usually has more samples than
            channels. It does not apply to text files, whose columns are always
            channels, nor to audio files, whose format says.

    Returns:
        The signal, float32 of shape (channels, samples).

    Raises:
        SignalError: the file cannot be read, is empty, all zero, holds NaN or
            infinite values (also once mixed or resampled), has the wrong shape,
            or lacks a requested channel, key, field or column.
        ConfigError: ``channel_axis``, ``channels`` or ``mat_key`` is not a
            value this function accepts.
    """
    _check_channel_axis(channel_axis)
    path = Path(path)
    raw, source_rate = _read_file(
        path,
        sample_rate=sample_rate,
        mat_key=mat_key,
        npz_key=npz_key,
        csv_columns=csv_columns,
        channel_axis=channel_axis,
    )
    _check_samples(raw, path)
    samples = select_channels(raw, channels, path=path)
    if source_rate != sample_rate:
        samples = resample(samples, source_rate, sample_rate)
    samples = _as_float32(samples, raw, path, source_rate=source_rate, sample_rate=sample_rate)
    return Signal(samples, sample_rate, source_rate)


def _check_channel_axis(channel_axis: str) -> None:
    if channel_axis not in CHANNEL_AXES:
        raise ConfigError(
            f"data.channel_axis={channel_axis!r} must be one of {', '.join(CHANNEL_AXES)}: "
            "first when the rows of a 2-D array are channels, last when its columns are, "
            "auto to take the shorter axis as channels"
        )


def _read_file(path: Path, **settings) -> tuple[np.ndarray, int]:
    """:func:`_read_samples`, a parser's own error turned into a :class:`SignalError`."""
    try:
        return _read_samples(path, **settings)
    except (SignalError, ConfigError):
        raise
    except Exception as err:  # a parser's own error on a damaged file (scipy's MatReadError,
        # zipfile's BadZipFile, a MemoryError for a header that claims terabytes, ...)
        reason = (str(err).splitlines() or [""])[0][:160]
        raise SignalError(
            f"{path}: cannot be read as a {path.suffix.lower()} file ({type(err).__name__}: "
            f"{reason}); re-export or remove it"
        ) from err


def _check_samples(samples: np.ndarray, path: Path) -> None:
    """Refuses a file's samples (channels, samples) that are empty, not finite or all zero."""
    if samples.shape[-1] == 0:
        raise SignalError(f"{path}: the file holds no samples; remove it or replace it")
    finite = np.isfinite(samples)
    if not finite.all():
        raise SignalError(
            f"{path}: the signal holds {finite.size - np.count_nonzero(finite)} NaN or infinite "
            f"value(s) among {finite.size} (or values beyond float32's ±3.4e38); clean or "
            "remove it (a file of another type read as floats looks like this)"
        )
    if not samples.any():
        raise SignalError(f"{path}: every sample is zero; a silent file carries no class")


def _as_float32(
    samples: np.ndarray, raw: np.ndarray, path: Path, *, source_rate: int, sample_rate: int
) -> np.ndarray:
    """``samples`` as contiguous float32, refused if a value left float32's range.

    ``raw`` is the file's samples before mixing and resampling, for the message.
    """
    with np.errstate(over="ignore"):  # an overflow becomes inf, reported just below
        samples = np.ascontiguousarray(samples, dtype=np.float32)
    if not np.isfinite(samples).all():
        step = (
            f"resampling from {source_rate} Hz to {sample_rate} Hz"
            if source_rate != sample_rate
            else "conversion to float32"
        )
        raise SignalError(
            f"{path}: peak magnitude {float(np.abs(raw).max()):.3g} leaves float32's range "
            f"(±{float(np.finfo(np.float32).max):.3g}) after {step}; such values are rarely "
            "a signal (bytes of another type read as floats?): check the file, or rescale it"
        )
    return samples


def _read_samples(
    path: Path, *, sample_rate: int, mat_key, npz_key, csv_columns, channel_axis: str
) -> tuple[np.ndarray, int]:
    """The file's samples (channels, samples) and its own rate (``sample_rate`` if it has none)."""
    suffix = path.suffix.lower()
    if suffix in AUDIO_SUFFIXES:
        return _read_audio(path)
    if suffix == ".npy":
        return _orient(_load_npy(path), path, channel_axis), sample_rate
    if suffix == ".npz":
        return _orient(_read_npz(path, npz_key), path, channel_axis), sample_rate
    if suffix in TEXT_SUFFIXES:
        return _read_text(path, csv_columns), sample_rate
    if suffix in MAT_SUFFIXES:
        return _orient(_read_mat(path, mat_key), path, channel_axis), sample_rate
    raise SignalError(
        f"{path}: suffix {suffix!r} is not supported; use one of {', '.join(SUFFIXES)}"
    )


def select_channels(samples: np.ndarray, channels: str | list[int], *, path: Path) -> np.ndarray:
    """Pick or mix channels of a (channels, samples) array.

    ``mix`` averages in float64 and returns float64 (1, samples): a float32 mean of
    huge finite values (up to 3.4e38) would overflow to inf.
    """
    if channels == "mix":
        return samples.mean(axis=0, keepdims=True, dtype=np.float64)
    if channels == "all":
        return samples
    if isinstance(channels, str):
        raise ConfigError(f"data.channels={channels!r} must be 'mix', 'all' or a list of indices")
    n = samples.shape[0]
    bad = [c for c in channels if not -n <= c < n]
    if bad:
        raise SignalError(
            f"{path}: has {n} channel(s), so data.channels={list(channels)} is out of range"
        )
    return samples[list(channels)]


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample (..., samples) from ``source_rate`` to ``target_rate`` (polyphase filter).

    The filter runs in float64; values the float32 result cannot hold (a filter's
    overshoot past 3.4e38) become inf, for the caller to check.
    """
    ratio = Fraction(target_rate, source_rate).limit_denominator(10_000)
    x = np.asarray(samples, dtype=np.float64)
    out = scipy.signal.resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)
    with np.errstate(over="ignore"):
        return out.astype(np.float32)


# The containers each audio suffix may hold. libsndfile reads many more (MATLAB, AIFF, raw
# formats) whatever the name, so a .mat renamed .wav would be read as sound.
AUDIO_FORMATS = {".wav": ("WAV", "WAVEX", "RF64", "W64"), ".flac": ("FLAC",), ".ogg": ("OGG",)}


def _read_audio(path: Path) -> tuple[np.ndarray, int]:
    try:
        with sf.SoundFile(os.fsencode(path)) as f:  # bytes: any file name, UTF-8 or not
            container = f.format
            data = f.read(dtype="float32", always_2d=True)  # (samples, channels)
            rate = f.samplerate
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise SignalError(
            f"{path}: not a readable audio file ({err}); re-export or remove it"
        ) from err
    allowed = AUDIO_FORMATS[path.suffix.lower()]
    if container not in allowed:
        raise SignalError(
            f"{path}: holds a {container} file, not {' or '.join(allowed)} as its suffix says; "
            "rename it to its real type or re-export it"
        )
    return data.T, int(rate)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise SignalError(
            f"{path}: not a readable .npy array ({err}); re-save it with numpy.save"
        ) from err


def _read_npz(path: Path, key: str | None) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if key is None and len(keys) == 1:
                key = keys[0]
            if key not in keys:
                hint = f"data.npz_key={key!r} is not among" if key else "pick one of"
                raise SignalError(f"{path}: {hint} its arrays {keys}; set data.npz_key")
            return archive[key]
    except (OSError, ValueError, EOFError) as err:
        raise SignalError(f"{path}: not a readable .npz archive ({err})") from err


def _read_text(path: Path, columns: list[int | str] | None) -> np.ndarray:
    """Numeric columns of a CSV or text file, an optional header line naming them."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError as err:
        raise SignalError(f"{path}: cannot be opened ({err})") from err
    delimiter = next((d for d in (",", ";", "\t") if d in first), None)
    tokens = [
        t.strip().strip('"') for t in (first.split(delimiter) if delimiter else first.split())
    ]
    header = [] if all(_is_number(t) for t in tokens if t) else tokens
    try:
        with warnings.catch_warnings():  # "input contained no data": reported as no samples
            warnings.simplefilter("ignore", UserWarning)
            data = np.loadtxt(
                path, delimiter=delimiter, skiprows=1 if header else 0, ndmin=2, dtype=np.float64
            )  # (samples, columns)
    except ValueError as err:
        raise SignalError(
            f"{path}: not a table of numbers ({err}); keep one header line at most and "
            "numeric columns only, or choose columns with data.csv_columns"
        ) from err
    if columns is not None:
        index = []
        for c in columns:
            if isinstance(c, str):
                if c not in header:
                    raise SignalError(f"{path}: no column named {c!r}; the header has {header}")
                index.append(header.index(c))
            elif not -data.shape[1] <= c < data.shape[1]:
                raise SignalError(
                    f"{path}: has {data.shape[1]} column(s), so data.csv_columns={columns} "
                    "is out of range"
                )
            else:
                index.append(c)
        data = data[:, index]
    with np.errstate(over="ignore"):  # beyond float32's range: inf, which the caller reports
        return data.T.astype(np.float32)


def _read_mat(path: Path, key: str | None) -> np.ndarray:
    """The variable of a MATLAB file whose name matches ``key``, or the field a field path
    ``<regex>.<field>...`` names (v7.3 files via h5py)."""
    field_path = _FIELD_PATH.fullmatch(key) if key else None
    if field_path:
        fields = field_path["fields"].split(".")[1:]
        pattern = _mat_pattern(key, field_path["variable"])
        return _read_mat_field(path, key, pattern, fields)
    try:
        loaded = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    except NotImplementedError:  # scipy: "Please use HDF reader for matlab v7.3 files"
        variables, structs = _read_mat73(path)
    except (OSError, ValueError, TypeError) as err:
        raise SignalError(f"{path}: not a readable MATLAB file ({err})") from err
    else:
        arrays = {k: v for k, v in loaded.items() if isinstance(v, np.ndarray)}
        variables = {k: v for k, v in arrays.items() if v.dtype.kind in "fiu"}
        structs = {k: list(v.dtype.names) for k, v in arrays.items() if v.dtype.names}
    names = sorted(variables)
    matches = names if key is None else [n for n in names if _mat_pattern(key, key).search(n)]
    if len(matches) != 1:
        found = "no variable" if not matches else f"{len(matches)} variables {matches}"
        rule = f"data.mat_key={key!r} matches" if key else "without data.mat_key there is"
        hint = ""
        if structs:
            name, fields = next(iter(sorted(structs.items())))
            example = f"{name}.{fields[0]}" if fields else f"{name}.<field>"
            hint = (
                f"; its struct variables {sorted(structs)} hold fields: name one with a "
                f"field path such as data.mat_key={example}"
            )
        raise SignalError(
            f"{path}: {rule} {found} among its numeric variables {names}; "
            f"set data.mat_key to a regular expression that picks exactly one{hint}"
        )
    return np.asarray(variables[matches[0]])


def _mat_pattern(key: str, regex: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as err:
        raise ConfigError(f"data.mat_key={key!r} is not a regular expression ({err})") from err


def _pick_struct(path: Path, key: str, pattern: re.Pattern, structs: list[str]) -> str:
    """The one struct variable (or v7.3 group) whose name ``pattern`` matches."""
    matches = [n for n in structs if pattern.search(n)]
    if len(matches) != 1:
        found = "no struct variable" if not matches else f"{len(matches)} struct variables"
        raise SignalError(
            f"{path}: data.mat_key={key!r} is a field path; its first part "
            f"{pattern.pattern!r} matches {found} {matches or ''}among the file's struct "
            f"variables {structs}; make it a regular expression that picks exactly one "
            "(or drop the fields to name a plain variable)"
        )
    return matches[0]


def _read_mat_field(path: Path, key: str, pattern: re.Pattern, fields: list[str]) -> np.ndarray:
    """The numeric field ``fields`` (outermost first) of the struct ``pattern`` matches."""
    try:
        loaded = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except NotImplementedError:  # v7.3: structs are HDF5 groups
        return _read_mat73_field(path, key, pattern, fields)
    except (OSError, ValueError, TypeError) as err:
        raise SignalError(f"{path}: not a readable MATLAB file ({err})") from err
    structs = sorted(
        k
        for k, v in loaded.items()
        if not k.startswith("__")
        and (
            isinstance(v, mat_struct)
            or (isinstance(v, np.ndarray) and any(isinstance(e, mat_struct) for e in v.flat))
        )
    )
    at = _pick_struct(path, key, pattern, structs)
    value = loaded[at]
    for field in fields:
        if isinstance(value, np.ndarray) and value.dtype == object:
            raise SignalError(
                f"{path}: data.mat_key={key!r}: {at} is an array of {value.size} element(s) "
                "(a struct array or cell array), which a field path cannot enter; save one "
                "struct per file"
            )
        if not isinstance(value, mat_struct):
            raise SignalError(
                f"{path}: data.mat_key={key!r}: {at} is {_describe(value)}, not a struct, "
                f"so it has no field {field!r}; end data.mat_key at {at}"
            )
        names = list(value._fieldnames)
        if field not in names:
            raise SignalError(
                f"{path}: data.mat_key={key!r}: struct {at} has no field {field!r}; its "
                f"fields are {names}"
            )
        value, at = getattr(value, field), f"{at}.{field}"
    if isinstance(value, mat_struct):
        raise SignalError(
            f"{path}: data.mat_key={key!r} ends at a struct, {at}, with fields "
            f"{list(value._fieldnames)}; add the one that holds the signal"
        )
    if not (isinstance(value, np.ndarray) and value.dtype.kind in "fiu"):
        raise SignalError(
            f"{path}: data.mat_key={key!r}: {at} is {_describe(value)}, not a numeric array "
            "of samples; name the field that holds the signal"
        )
    return value


def _describe(value: object) -> str:
    """A short phrase for a loaded MATLAB value (squeezed: a scalar comes as a number)."""
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    if isinstance(value, (int, float, complex, np.number)):
        return f"the scalar {value!r}"
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    return f"a {type(value).__name__}"


def _import_h5py(path: Path):
    try:
        import h5py
    except ImportError as err:
        raise SignalError(
            f"{path}: a MATLAB v7.3 (HDF5) file needs h5py; pip install h5py, or re-save "
            "it in MATLAB with save(..., '-v7')"
        ) from err
    return h5py


def _read_mat73(path: Path) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """The numeric variables of a v7.3 file, and its structs (groups) with their fields."""
    h5py = _import_h5py(path)
    try:
        with h5py.File(path, "r") as f:
            # MATLAB writes column-major: h5py sees the dimensions reversed.
            variables = {
                k: np.asarray(v).T
                for k, v in f.items()
                if isinstance(v, h5py.Dataset) and v.dtype.kind in "fiu"
            }
            structs = {
                k: sorted(v) for k, v in f.items() if isinstance(v, h5py.Group) and k[0] != "#"
            }
    except OSError as err:
        raise SignalError(f"{path}: not a readable MATLAB v7.3 file ({err})") from err
    return variables, structs


def _read_mat73_field(path: Path, key: str, pattern: re.Pattern, fields: list[str]) -> np.ndarray:
    """A v7.3 struct's field: a struct is an HDF5 group, each field a dataset or group."""
    h5py = _import_h5py(path)
    try:
        with h5py.File(path, "r") as f:
            # "#refs#" holds the targets of cell and struct-array references.
            structs = sorted(k for k, v in f.items() if isinstance(v, h5py.Group) and k[0] != "#")
            at = _pick_struct(path, key, pattern, structs)
            node = f[at]
            for field in fields:
                if not isinstance(node, h5py.Group):
                    raise SignalError(
                        f"{path}: data.mat_key={key!r}: {at} is not a struct, so it has no "
                        f"field {field!r}; end data.mat_key at {at}"
                    )
                if field not in node:
                    raise SignalError(
                        f"{path}: data.mat_key={key!r}: struct {at} has no field {field!r}; "
                        f"its fields are {sorted(node)}"
                    )
                node, at = node[field], f"{at}.{field}"
            if isinstance(node, h5py.Group):
                raise SignalError(
                    f"{path}: data.mat_key={key!r} ends at a struct, {at}, with fields "
                    f"{sorted(node)}; add the one that holds the signal"
                )
            if node.dtype.kind not in "fiu":
                raise SignalError(
                    f"{path}: data.mat_key={key!r}: {at} holds {node.dtype} data, not numbers "
                    "(in a v7.3 file a struct array or cell array is stored as references, "
                    "which this reader does not follow); save the signal as a numeric field "
                    "of a single struct, or re-save the file with save(..., '-v7')"
                )
            return np.asarray(node).T  # column-major on disk: dimensions reversed
    except OSError as err:
        raise SignalError(f"{path}: not a readable MATLAB v7.3 file ({err})") from err


def _orient(data: np.ndarray, path: Path, channel_axis: str = "auto") -> np.ndarray:
    """A 1-D or 2-D numeric array as float32 (channels, samples).

    ``channel_axis`` says which axis of a 2-D array holds the channels: ``first``,
    ``last``, or ``auto``: the shorter axis (rows when the array is square).
    """
    if not np.issubdtype(data.dtype, np.number):
        raise SignalError(f"{path}: array dtype {data.dtype} is not numeric")
    if np.iscomplexobj(data):
        raise SignalError(
            f"{path}: array dtype {data.dtype} is complex; save its real part or its magnitude "
            "as the signal"
        )
    data = np.squeeze(data) if data.ndim > 2 else data
    if data.ndim == 1:
        data = data[None, :]
    elif data.ndim == 2:
        tall = data.shape[0] > data.shape[1]
        if channel_axis == "last" or (channel_axis == "auto" and tall):  # (samples, channels)
            data = data.T
    else:
        raise SignalError(
            f"{path}: array of shape {data.shape} is not 1-D or 2-D; save one signal per file"
        )
    with np.errstate(over="ignore"):  # beyond float32's range: inf, which the caller reports
        return data.astype(np.float32)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True
