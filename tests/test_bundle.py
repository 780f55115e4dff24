import json

import numpy as np
import pytest
import torch

from pipeline.bundle import load_bundle, save_bundle
from pipeline.errors import BundleError
from pipeline.features.stft import Normalizer, STFTParams
from pipeline.models.resnet import build_resnet
from pipeline.models.svm import SVMClassifier

PARAMS = STFTParams(
    n_fft=64, hop_length=16, win_length=64, window="hann", center=True, pad_mode="reflect",
    power=2, scale="db", top_db=80.0, size=(16, 12),
)  # fmt: skip
DATA = {
    "sample_rate": 1000,
    "channels": "mix",
    "segment_samples": 500,
    "hop_samples": 500,
    "pad": True,
}


def images(n=24, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 1, 16, 12)).astype(np.float32)
    for c in range(3):
        x[y == c, :, 4 * c : 4 * c + 4] += 2
    return x, y


def save(path, model, x):
    return save_bundle(
        path, model, classes=["a", "b", "c"], data=DATA, features=PARAMS,
        normalizer=Normalizer.fit(x, mode="per_freq"), extra={"name": "m"},
    )  # fmt: skip


def test_network_bundle_round_trip(tmp_path):
    x, _ = images()
    torch.manual_seed(0)
    model = build_resnet(num_classes=3, in_channels=1, depth=8, shortcut="A").eval()
    save(tmp_path / "net", model, x)
    bundle = load_bundle(tmp_path / "net")
    assert bundle.kind == "network" and bundle.classes == ["a", "b", "c"]
    assert bundle.features == PARAMS and bundle.data == DATA
    np.testing.assert_array_equal(bundle.normalizer.mean, Normalizer.fit(x, mode="per_freq").mean)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(torch.from_numpy(x)), model(torch.from_numpy(x)))
    meta = json.loads((tmp_path / "net" / "bundle.json").read_text())
    assert meta["format_version"] == 1 and "torch" in meta["versions"]


def test_a_per_group_bundle_is_version_2_which_releases_reading_only_1_refuse(tmp_path):
    x, _ = images()
    save_bundle(
        tmp_path / "net", build_resnet(num_classes=3, depth=8), classes=["a", "b", "c"],
        data=DATA, features=PARAMS, normalizer=Normalizer.fit(x, mode="global", per_group="freq"),
    )  # fmt: skip
    assert json.loads((tmp_path / "net" / "bundle.json").read_text())["format_version"] == 2
    assert load_bundle(tmp_path / "net").normalizer.per_group == "freq"


def test_svm_bundle_round_trip(tmp_path):
    x, y = images()
    model = SVMClassifier(C=[1.0], gamma=["scale"], cv=2).fit(x, y)
    save(tmp_path / "svm", model, x)
    bundle = load_bundle(tmp_path / "svm")
    assert bundle.kind == "svm"
    np.testing.assert_array_equal(bundle.model.decision_function(x), model.decision_function(x))


def test_incomplete_or_foreign_bundles_are_refused(tmp_path):
    with pytest.raises(BundleError, match="no bundle.json"):
        load_bundle(tmp_path)
    x, _ = images()
    save(tmp_path / "net", build_resnet(num_classes=3, depth=8), x)
    meta_path = tmp_path / "net" / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(
        BundleError, match=r"format_version=99, but this release reads versions \[1, 2\]"
    ):
        load_bundle(tmp_path / "net")
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "net" / "weights.pt").unlink()
    with pytest.raises(BundleError, match="weights.pt is missing"):
        load_bundle(tmp_path / "net")
