"""Images on disk (pipeline.features.store), read through views (pipeline.features.view) and
the statistics fitted over them a chunk at a time: what the streamed main job stands on."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.features import stft
from pipeline.features.stft import Normalizer, group_profiles
from pipeline.features.store import ImageFile, ImageWriter, storage_dtype
from pipeline.features.view import ImageView, chunked

REPO = Path(__file__).resolve().parents[1]


def written(path, images, dtype="float32", batch=7) -> ImageFile:
    with ImageWriter(path, dtype) as w:
        for i in range(0, len(images), batch):
            w.append(images[i : i + batch])
    return ImageFile(path)


@pytest.fixture
def images():
    return np.random.default_rng(0).normal(-40, 15, size=(50, 2, 8, 4)).astype(np.float32)


def test_images_written_in_batches_read_back_by_any_rows(tmp_path, images):
    f = written(tmp_path / "images.npy", images)
    assert f.shape == images.shape and len(f) == 50 and f.dtype == np.float32
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), images)  # a plain .npy
    rows = np.array([49, 3, 4, 5, 3, 0, -1])  # unsorted, runs, repeats, negative
    np.testing.assert_array_equal(f[rows], images[rows])
    np.testing.assert_array_equal(f[10:20], images[10:20])
    np.testing.assert_array_equal(f[images[:, 0, 0, 0] > -40], images[images[:, 0, 0, 0] > -40])
    np.testing.assert_array_equal(f[7], images[7])
    np.testing.assert_array_equal(f[[2, 3], 1], images[[2, 3], 1])
    np.testing.assert_array_equal(np.asarray(f), images)
    assert f[np.array([], dtype=int)].shape == (0, 2, 8, 4)
    with pytest.raises(IndexError):
        f[np.array([50])]


def test_float16_halves_the_file_and_rounds_as_numpy_does(tmp_path, images):
    f16 = written(tmp_path / "a.npy", images, "float16")
    f32 = written(tmp_path / "b.npy", images, "float32")
    assert f16.nbytes * 2 == f32.nbytes
    got = f16[np.arange(50)]
    assert got.dtype == np.float32  # read as float32, like the in-memory images
    np.testing.assert_array_equal(got, images.astype(np.float16).astype(np.float32))
    assert np.abs(got - images).max() <= np.abs(images).max() * 2.0**-11


def test_float16_refuses_values_it_cannot_hold_naming_the_setting(tmp_path):
    writer = ImageWriter(tmp_path / "x.npy", "float16")
    with pytest.raises(ConfigError, match=r"features.dtype=float16 .*float32 or auto"):
        writer.append(np.full((2, 1, 4, 4), 1e6, np.float32))  # power of a loud signal
    writer.abort()


def test_auto_storage_is_float16_only_for_log_compressed_images():
    assert storage_dtype("auto", scale="db") == np.float16
    assert storage_dtype("auto", scale="log1p") == np.float16
    assert storage_dtype("auto", scale="power") == np.float32  # 1e-10 underflows float16
    assert storage_dtype("float32", scale="db") == np.float32
    with pytest.raises(ConfigError, match="dtype='half' must be auto"):
        storage_dtype("half", scale="db")


@pytest.mark.parametrize(
    "mode,per_image", [("global", False), ("per_freq", False), ("per_freq", True)]
)
def test_the_normaliser_fitted_a_chunk_at_a_time_equals_one_pass(
    monkeypatch, images, mode, per_image
):
    whole = Normalizer.fit(images, mode=mode, per_image=per_image)
    monkeypatch.setattr(stft, "FIT_CHUNK_BYTES", 7 * 4 * 64)  # 8 chunks, the last of one image
    chunked_fit = Normalizer.fit(images, mode=mode, per_image=per_image)
    np.testing.assert_allclose(chunked_fit.mean, whole.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(chunked_fit.std, whole.std, rtol=1e-6)
    x = images if not per_image else stft._standardise_each(images, per_image)
    axes = (0, 1, 2, 3) if mode == "global" else (0, 3)
    np.testing.assert_allclose(chunked_fit.std.ravel(), x.std(axis=axes).ravel(), rtol=1e-5)


def test_a_view_reads_normalised_batches_and_materialises_the_same_numbers(tmp_path, images):
    f = written(tmp_path / "images.npy", images, "float16")
    norm = Normalizer.fit(f, mode="per_freq")  # fitted straight from the file
    rows = np.array([1, 5, 9, 20, 33, 48])
    view = ImageView(f, rows, norm)
    assert len(view) == 6 and view.shape == (6, 2, 8, 4) and view.nbytes == 6 * 64 * 4
    expected = norm.torch(torch.from_numpy(f[rows]))
    torch.testing.assert_close(view[:], expected, rtol=0, atol=0)
    torch.testing.assert_close(view[torch.tensor([4, 0])], expected[[4, 0]], rtol=0, atol=0)
    torch.testing.assert_close(view.materialise(), expected, rtol=0, atol=0)
    torch.testing.assert_close(view.subset(np.array([2, 3]))[:], expected[2:4], rtol=0, atol=0)
    torch.testing.assert_close(view[1, 0], expected[1, 0], rtol=0, atol=0)
    sums = chunked(lambda x: x.reshape(len(x), -1).sum(1, keepdims=True), view)
    np.testing.assert_allclose(sums[:, 0], expected.reshape(6, -1).sum(1).numpy(), rtol=1e-5)


def test_group_profiles_over_a_view_equal_those_over_the_array(monkeypatch, tmp_path, images):
    f = written(tmp_path / "images.npy", images)
    groups = np.array(["a", "b", "c"] * 16 + ["a", "a"], dtype=object)
    monkeypatch.setattr(stft, "FIT_CHUNK_BYTES", 9 * 4 * 64)
    got = group_profiles(ImageView(f, np.arange(50)), groups)
    want = {g: images[groups == g].mean(axis=(0, 3))[..., None] for g in "abc"}
    for g in "abc":
        np.testing.assert_allclose(got[g], want[g], rtol=1e-5, atol=1e-5)


# Peak memory of a streamed fit, at two sizes ten times apart, in child processes. The data
# grows by 28 MB of float16 (57 MB as float32); the streamed path must not grow with it.
# Batches are 256 at both sizes: a larger batch's activations would grow the peak too.
PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from pipeline.features.store import ImageFile, ImageWriter
    from pipeline.features import stft
    from pipeline.features.stft import Normalizer
    from pipeline.features.view import ImageView
    from pipeline.fit import TrainSettings, fit, predict_logits
    from pipeline.models.resnet import build_resnet

    torch.set_num_threads(1)
    stft.FIT_CHUNK_BYTES = 1 << 20  # 128 images a chunk: both sizes are many chunks
    path, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rng = np.random.default_rng(0)
    with ImageWriter(path, "float16") as w:
        for i in range(0, n, 500):
            w.append(rng.normal(-40, 15, size=(min(500, n - i), 1, 64, 32)).astype(np.float32))
    f = ImageFile(path)
    rows = np.arange(n)
    view = ImageView(f, rows, Normalizer.fit(ImageView(f, rows), mode="per_freq"))
    x = view if mode == "streamed" else view.materialise()
    y = torch.from_numpy(rng.integers(0, 2, n))
    model = build_resnet(num_classes=2, depth=8, width=0.25)
    # a few steps of shuffled batches (training's reads), then every row (evaluation's)
    s = TrainSettings(epochs=1, batch_size=256, min_steps=0, max_steps=6, precise_bn=False,
                      amp=False)
    fit(model, x, y, x[:0], y[:0], settings=s, device=torch.device("cpu"), seed=0,
        progress=False)
    logits = predict_logits(model, x, device=torch.device("cpu"), amp=False)
    assert logits.shape == (n, 2) and torch.isfinite(logits).all()
    # VmHWM: this process's own peak; ru_maxrss keeps a larger parent's across fork and exec
    status = open("/proc/self/status").read()
    print(json.dumps({"peak_mb": int(status.split("VmHWM:")[1].split()[0]) / 1024}))
    """
)


def peak_mb(tmp_path: Path, n: int, mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / f"{mode}{n}.npy"), str(n), mode],
        capture_output=True,
        text=True,
        cwd=REPO,
        # glibc's dynamic mmap threshold leaves freed batch buffers in a heap that fragments by
        # tens of MB over an epoch's steps, whatever is held; a fixed threshold keeps that
        # noise out of what this measures (the whole job's peak: python -m pipeline.bench scale)
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "131072"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def test_a_streamed_fit_does_not_grow_with_the_data(tmp_path):
    small, large = peak_mb(tmp_path, 768, "streamed"), peak_mb(tmp_path, 7680, "streamed")
    held = peak_mb(tmp_path, 7680, "held")  # the same data in memory: the measure sees it
    assert large - small < 8, (small, large)
    assert held - large > 30, (large, held)


def test_the_images_are_held_only_when_they_take_under_a_quarter_of_the_memory(
    monkeypatch, tmp_path, images, caplog
):
    from omegaconf import OmegaConf

    from pipeline.tasks import compare

    view = ImageView(written(tmp_path / "images.npy", images), np.arange(50))  # 12,800 bytes
    cfg = OmegaConf.create({"features": {"in_memory": "auto"}})
    with caplog.at_level("INFO", logger="pipeline.tasks.compare"):
        monkeypatch.setattr(compare, "available_memory", lambda: 4 * 12_800 + 4)
        assert compare.hold_in_memory(cfg, view, on_disk=True)
        monkeypatch.setattr(compare, "available_memory", lambda: 4 * 12_800)
        assert not compare.hold_in_memory(cfg, view, on_disk=True)
        assert compare.hold_in_memory(cfg, view, on_disk=False)  # features.cache=false
    assert "read a batch at a time from the feature cache (features.in_memory=auto" in caplog.text
    cfg.features.in_memory = True
    assert compare.hold_in_memory(cfg, view, on_disk=True)
    cfg.features.in_memory = "maybe"
    with pytest.raises(ConfigError, match="features.in_memory='maybe' must be auto"):
        compare.check_storage(OmegaConf.merge(cfg, {"data": {"workers": 0}}))
    with pytest.raises(ConfigError, match="data.workers=-1 must be auto or a whole number"):
        compare.check_storage(OmegaConf.create({"data": {"workers": -1}, "features": {}}))
