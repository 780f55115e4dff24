"""Hundreds of malformed inputs in a good folder: every one reported, none changes a result.

:func:`malformed_files` writes at least 200 broken files across every supported format
(random bytes, truncations at random offsets, extreme and non-finite values, wrong
shapes, dtypes and headers, files of one format under another's suffix). Compare (SVM
only, to stay fast) and predict run over the good folder with and without them; each
bad file must be listed with a reason, and the good files must get the same
predictions either way.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import soundfile as sf

from pipeline.signals import SUFFIXES
from tests.conftest import write_tone_dataset

REPO = Path(__file__).resolve().parents[1]
RATE = 1000
N_SAMPLES = 500
CLASSES = ("low", "mid", "high")


def _sine(scale: float = 0.3) -> np.ndarray:
    return (scale * np.sin(2 * np.pi * 60 * np.arange(N_SAMPLES) / RATE)).astype("f4")


def _wav_bytes(x: np.ndarray, fmt: str = "WAV", subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, RATE, format=fmt, subtype=subtype)
    return buf.getvalue()


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _mat_bytes(**variables) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables)
    return buf.getvalue()


def _text(x: np.ndarray) -> bytes:
    return "\n".join(f"{v!r}" for v in x.tolist()).encode()


def _unreadable_contents(rng: np.random.Generator) -> dict[str, Callable[[], bytes]]:
    """Bad contents any suffix must reject: {kind: make bytes}."""
    return {
        "empty": lambda: b"",
        "one_byte": lambda: b"\x00",
        **{f"random_{n}": (lambda n=n: rng.bytes(n)) for n in (7, 100, 513, 4096, 65536)},
        "text_words": lambda: b"hello world, this is not a signal\n" * 3,
        "html": lambda: b"<html><body>404 Not Found</body></html>",
    }


def _by_format(rng: np.random.Generator) -> dict[str, dict[str, Callable[[], bytes]]]:
    """Bad contents specific to each suffix: {suffix: {kind: make bytes}}."""
    good_wav = _wav_bytes(_sine())
    good_flac = _wav_bytes(_sine(), "FLAC", "PCM_16")
    good_ogg = _wav_bytes(_sine(), "OGG", "VORBIS")
    good_npy = _npy_bytes(_sine())
    good_npz = _npz_bytes(x=_sine())
    good_mat = _mat_bytes(x=_sine())
    nan = _sine().copy()
    nan[10] = np.nan
    inf = _sine().copy()
    inf[-1] = np.inf
    huge = _sine(1e30)

    def cut(good: bytes, stop: int) -> Callable[[], bytes]:
        """``good`` cut at a random offset before ``stop`` (inside its header or structure)."""
        return lambda: good[: int(rng.integers(1, stop))]

    def header_noise(good: bytes, start: int, stop: int) -> Callable[[], bytes]:
        return lambda: good[:start] + rng.bytes(stop - start) + good[stop:]

    audio = {
        ".wav": {
            **{f"cut_{i}": cut(good_wav, 44) for i in range(8)},
            "fmt_noise": header_noise(good_wav, 12, 36),
            "nan": lambda: _wav_bytes(nan),
            "inf": lambda: _wav_bytes(inf),
            "huge_1e30": lambda: _wav_bytes(huge),
            "huge_3e38": lambda: _wav_bytes(np.full(N_SAMPLES, 3e38, "f4") * np.sign(_sine())),
            "silent": lambda: _wav_bytes(np.zeros(N_SAMPLES, "f4")),
            "one_sample": lambda: _wav_bytes(np.zeros(1, "f4") + 0.1)[:48],
            "npy_inside": lambda: good_npy,
            "mat_inside": lambda: good_mat,
        },
        ".flac": {
            **{f"cut_{i}": cut(good_flac, 42) for i in range(8)},
            "streaminfo_noise": header_noise(good_flac, 8, 42),
            "silent": lambda: _wav_bytes(np.zeros(N_SAMPLES, "f4"), "FLAC", "PCM_16"),
            "wav_header_only": lambda: good_wav[:44],
            "npz_inside": lambda: good_npz,
        },
        ".ogg": {
            **{f"cut_{i}": cut(good_ogg, 58) for i in range(8)},
            "page_noise": header_noise(good_ogg, 4, 58),
            "silent": lambda: _wav_bytes(np.zeros(N_SAMPLES, "f4"), "OGG", "VORBIS"),
            "flac_inside": lambda: good_flac[:20],
        },
    }
    arrays = {
        ".npy": {
            **{f"cut_{i}": cut(good_npy, len(good_npy)) for i in range(12)},
            "nan": lambda: _npy_bytes(nan),
            "inf": lambda: _npy_bytes(inf),
            "huge_1e30": lambda: _npy_bytes(huge),
            "huge_3e38": lambda: _npy_bytes(np.full(N_SAMPLES, 3e38, "f4") * np.sign(_sine())),
            "float64_1e300": lambda: _npy_bytes(np.full(N_SAMPLES, 1e300)),
            "zeros": lambda: _npy_bytes(np.zeros(N_SAMPLES)),
            "three_d": lambda: _npy_bytes(rng.standard_normal((2, 3, N_SAMPLES))),
            "empty_array": lambda: _npy_bytes(np.zeros(0, "f4")),
            "empty_2d": lambda: _npy_bytes(np.zeros((0, 5), "f4")),
            "scalar": lambda: _npy_bytes(np.float32(1.0)),
            "object": lambda: _npy_bytes(np.array([{"a": 1}, None], dtype=object)),
            "strings": lambda: _npy_bytes(np.array(["a", "b", "c"])),
            "bool": lambda: _npy_bytes(np.ones(N_SAMPLES, bool)),
            "magic_noise": header_noise(good_npy, 0, 8),
            "header_noise": header_noise(good_npy, 10, 60),
            "wav_inside": lambda: good_wav,
        },
        ".npz": {
            **{f"cut_{i}": cut(good_npz, len(good_npz) - 22) for i in range(10)},
            "no_arrays": lambda: _npz_bytes(),
            "two_arrays": lambda: _npz_bytes(a=_sine(), b=_sine()),
            "nan": lambda: _npz_bytes(x=nan),
            "huge_1e30": lambda: _npz_bytes(x=huge),
            "huge_3e38": lambda: _npz_bytes(x=np.full(N_SAMPLES, 3e38, "f4") * np.sign(_sine())),
            "object": lambda: _npz_bytes(x=np.array([None, 1], dtype=object)),
            "three_d": lambda: _npz_bytes(x=rng.standard_normal((2, 3, N_SAMPLES))),
            "zip_of_text": lambda: _zip_of_text(),
            "npy_inside": lambda: good_npy,
        },
        ".mat": {
            **{f"cut_{i}": cut(good_mat, len(good_mat)) for i in range(10)},
            "header_only": lambda: good_mat[:128],
            "no_numeric": lambda: _mat_bytes(name="text only"),
            "two_numeric": lambda: _mat_bytes(a=_sine(), b=_sine()),
            "nan": lambda: _mat_bytes(x=nan),
            "huge_1e30": lambda: _mat_bytes(x=huge.astype("f8")),
            "huge_3e38": lambda: _mat_bytes(x=np.full(N_SAMPLES, 3e38, "f4") * np.sign(_sine())),
            "three_d": lambda: _mat_bytes(x=rng.standard_normal((2, 3, N_SAMPLES))),
            "zeros": lambda: _mat_bytes(x=np.zeros(N_SAMPLES)),
            "body_noise": header_noise(good_mat, 128, 200),
            "csv_inside": lambda: _text(_sine()),
        },
    }
    text = {
        "words": lambda: b"a,b,c\nx,y,z\nfoo,bar,baz\n",
        "ragged": lambda: b"1,2,3\n4,5\n6,7,8\n" * 20,
        "header_only": lambda: b"time,value\n",
        "nan": lambda: _text(nan),
        "inf": lambda: _text(inf),
        "huge_1e30": lambda: _text(huge.astype("f8")),
        "huge_3e38": lambda: _text(
            (np.full(N_SAMPLES, 3e38, "f4") * np.sign(_sine())).astype("f8")
        ),
        "beyond_float32": lambda: _text(np.full(N_SAMPLES, 1e39)),
        "zeros": lambda: _text(np.zeros(N_SAMPLES)),
        "binary": lambda: rng.bytes(2048),
        "mixed_cells": lambda: b"1.0\n2.0\nthree\n4.0\n" * 10,
        "two_headers": lambda: b"a\nb\n1\n2\n3\n",
    }
    return {**audio, **arrays, ".csv": text, ".txt": dict(text)}


def _zip_of_text() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", b"not an array")
    return buf.getvalue()


def malformed_files(root: Path, *, seed: int = 0) -> list[Path]:
    """Write the malformed inputs into ``root``'s class folders; returns their paths."""
    rng = np.random.default_rng(seed)
    kinds: list[tuple[str, str, Callable[[], bytes]]] = []
    for suffix in SUFFIXES:
        kinds += [(suffix, k, make) for k, make in _unreadable_contents(rng).items()]
    for suffix, specific in _by_format(rng).items():
        kinds += [(suffix, k, make) for k, make in specific.items()]
    paths = []
    for i, (suffix, kind, make) in enumerate(kinds):
        path = root / CLASSES[i % len(CLASSES)] / f"bad_{i:03d}_{kind}{suffix}"
        path.write_bytes(make())
        paths.append(path)
    return paths


def cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run", *overrides, "progress=false"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def compare(data: Path, run: Path) -> subprocess.CompletedProcess:
    # A fixed test split (takes 4 and 5 of each class) and no validation split, so the bad
    # files change no split of the good ones; an SVM only, to stay fast.
    return cli(
        "data=folder",
        f"data.root={data}",
        f"data.sample_rate={RATE}",
        "data.split=regex",
        "data.test_regex='_0[45][.]wav$'",
        "data.val_fraction=0",
        "models=[svm]",
        "svm.C=[1.0,10.0]",
        "svm.gamma=[scale]",
        "svm.cv=2",
        "features.cache=false",
        f"hydra.run.dir={run}",
    )


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    tmp = tmp_path_factory.mktemp("robust")
    good = write_tone_dataset(tmp / "good", rate=RATE)
    mixed = write_tone_dataset(tmp / "mixed", rate=RATE)
    return good, mixed, malformed_files(mixed)


def test_the_generator_writes_at_least_200_inputs_in_every_format(folders):
    _, _, bad = folders
    assert len(bad) >= 200
    assert {p.suffix for p in bad} == set(SUFFIXES)


@pytest.mark.slow
def test_compare_and_predict_report_every_malformed_file_and_keep_the_good_results(
    folders, tmp_path
):
    good, mixed, bad = folders
    runs = {}
    for name, data in (("good", good), ("mixed", mixed)):
        proc = compare(data, tmp_path / name)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        runs[name] = tmp_path / name
    skipped = {r["path"]: r["reason"] for r in rows(runs["mixed"] / "skipped.csv")}
    missing = [str(p) for p in bad if not skipped.get(str(p), "").strip()]
    assert not missing, f"{len(missing)} malformed file(s) not reported: {missing[:5]}"
    assert len(skipped) == len(bad)  # and no good file
    test_rows = {
        name: [
            (r["path"].replace(str(good), "").replace(str(mixed), ""), r["predicted"])
            for r in rows(runs[name] / "predictions" / "svm.csv")
        ]
        for name in runs
    }
    assert test_rows["mixed"] == test_rows["good"] and len(test_rows["good"]) == 6

    bundle = runs["good"] / "models" / "svm"
    predicted = {}
    for name, data in (("good", good), ("mixed", mixed)):
        out = tmp_path / f"predict-{name}" / "predictions.csv"
        proc = cli(
            "task=predict",
            f"predict.model={bundle}",
            f"predict.input={data}",
            f"predict.output={out}",
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        predicted[name] = {
            Path(r["path"]).relative_to(data).as_posix(): (r["predicted"], r["confidence"])
            for r in rows(out)
        }
        if name == "mixed":
            errors = {r["path"]: r["reason"] for r in rows(out.with_name("predictions_errors.csv"))}
            unreported = [str(p) for p in bad if not errors.get(str(p), "").strip()]
            assert not unreported, f"{len(unreported)} not in the errors CSV: {unreported[:5]}"
    assert predicted["mixed"] == predicted["good"] and len(predicted["good"]) == 18
