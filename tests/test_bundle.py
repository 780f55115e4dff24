import json
import pickle
import sys

import numpy as np
import pytest
import torch

from pipeline.bundle import FORMAT_VERSION, load_bundle, save_bundle
from pipeline.errors import BundleError
from pipeline.features.stft import Normalizer, STFTParams
from pipeline.frontend import Frontend
from pipeline.models.resnet import build_resnet
from pipeline.models.svm import SVMClassifier

PARAMS = STFTParams(
    n_fft=64,
    hop_length=16,
    win_length=64,
    window="hann",
    center=True,
    pad_mode="reflect",
    power=2,
    scale="db",
    top_db=80.0,
    size=(16, 12),
)
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
        path,
        model,
        classes=["a", "b", "c"],
        frontend=Frontend.from_settings(DATA, PARAMS, Normalizer.fit(x, mode="per_freq")),
        extra={"name": "m"},
    )


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
    assert meta["format_version"] == FORMAT_VERSION == 4 and "torch" in meta["versions"]


def test_a_per_group_bundle_round_trips_in_the_one_format(tmp_path):
    x, _ = images()
    save_bundle(
        tmp_path / "net",
        build_resnet(num_classes=3, depth=8),
        classes=["a", "b", "c"],
        frontend=Frontend.from_settings(
            DATA, PARAMS, Normalizer.fit(x, mode="global", per_group="freq")
        ),
    )
    assert json.loads((tmp_path / "net" / "bundle.json").read_text())["format_version"] == 4
    assert load_bundle(tmp_path / "net").normalizer.per_group == "freq"


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_bundle_of_an_older_format_is_refused_with_one_sentence(tmp_path, version):
    x, _ = images()
    save(tmp_path / "net", build_resnet(num_classes=3, depth=8), x)
    meta_path = tmp_path / "net" / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": version}))
    with pytest.raises(BundleError) as err:
        load_bundle(tmp_path / "net")
    assert str(err.value) == (
        f"{meta_path}: bundle format {version} is from an older version of this tool; retrain "
        "the model with this version"
    )


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
    with pytest.raises(BundleError, match=r"format_version=99, but this release reads format 4"):
        load_bundle(tmp_path / "net")
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "net" / "weights.pt").unlink()
    with pytest.raises(BundleError, match="weights.pt is missing"):
        load_bundle(tmp_path / "net")


# Tampered bundles: each test damages one real saved bundle on disk, as an edit, a
# copy from another run or a malicious file would, and loading it must give one
# BundleError naming the file and the key, never a traceback or a wrong prediction.


def network_bundle(tmp_path, **model):
    x, _ = images()
    torch.manual_seed(0)
    config = {"num_classes": 3, "in_channels": 1, "depth": 8, "shortcut": "A", **model}
    return save(tmp_path / "net", build_resnet(**config).eval(), x)


def svm_bundle(tmp_path):
    x, y = images()
    return save(tmp_path / "svm", SVMClassifier(C=[1.0], gamma=["scale"], cv=2).fit(x, y), x)


def edit_meta(bundle, change):
    """Rewrite ``bundle``'s bundle.json with ``change(meta)`` applied."""
    path = bundle / "bundle.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _set(*keys, value):
    def change(meta):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    change.__name__ = f"{'.'.join(keys)}={value!r}"
    return change


def _delete(*keys):
    def change(meta):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    change.__name__ = f"no {'.'.join(keys)}"
    return change


TAMPERED_JSON = [
    (_delete("classes"), r"key classes is missing"),
    (_delete("kind"), r"key kind is missing"),
    (_delete("model_config"), r"key model_config is missing"),
    (_delete("data", "segment_samples"), r"key data\.segment_samples is missing"),
    (_delete("normalizer", "std"), r"key normalizer\.std is missing"),
    (_set("data", value=[1, 2]), r"data=\[1, 2\] must be a JSON object"),
    (_set("classes", value=["a", "b", "c", "d", "e"]), r"classes holds 5 names .* scores 3"),
    (_set("classes", value=["a", "a", "b"]), r"classes=\['a', 'a', 'b'\] must be a list"),
    (_set("normalizer", "std", value=0), r"normalizer\.std holds 1 value\(s\) <= 0"),
    (_set("normalizer", "std", value=1e-50), r"normalizer\.std holds 1 value\(s\) <= 0"),
    (_set("normalizer", "mean", value=[[["x"]]]), r"normalizer\.mean is not a numeric"),
    (_set("normalizer", "mean", value=[[[0.0]] * 7]), r"normalizer\.mean has shape \(1, 7, 1\)"),
    (_set("normalizer", "per_image", value="yes"), r"normalizer\.per_image='yes' must be"),
    (_set("data", "segment_samples", value=0), r"data\.segment_samples=0 must be a positive"),
    (_set("data", "hop_samples", value=1.5), r"data\.hop_samples=1\.5 must be a positive"),
    (_set("data", "pad", value="no"), r"data\.pad='no' must be true or false"),
    (_set("data", "channels", value=[0, 1]), r"data\.channels=\[0, 1\] gives 2 channel"),
    (_set("data", "mat_key", value=5), r"data\.mat_key=5 must be a string or null"),
    (_set("features", "n_fft", value=0), r"features do not .*features\.n_fft=0 must be a"),
    (_set("features", "nfft", value=64), r"features do not .*unexpected keyword.*'nfft'"),
    (_set("features", "sample_rate", value=2000), r"features\.sample_rate=2000 differs"),
    (
        _set("features", "size", value=None),
        r"normalizer\.mean has shape \(1, 16, 1\).*\(1, 33, 32\)",
    ),
    (_set("kind", value="tree"), r"kind='tree' is not one of \['network', 'svm', 'minirocket'\]"),
    (_set("model_config", "depth", value=9), r"model_config does not build a network: depth=9"),
    (
        _set("model_config", "in_channels", value=0),
        r"model_config\.in_channels=0 must be a positive",
    ),
]


@pytest.mark.parametrize(
    "change, match", TAMPERED_JSON, ids=[change.__name__ for change, _ in TAMPERED_JSON]
)
def test_a_tampered_bundle_json_is_refused_naming_file_and_key(tmp_path, change, match):
    bundle = network_bundle(tmp_path)
    edit_meta(bundle, change)
    with pytest.raises(BundleError, match=rf"bundle\.json: .*{match}"):
        load_bundle(bundle)


def test_bundle_json_that_is_not_json_or_not_an_object_is_refused(tmp_path):
    bundle = network_bundle(tmp_path)
    (bundle / "bundle.json").write_text('{"kind": "network", ')
    with pytest.raises(BundleError, match=r"bundle\.json: is not readable JSON"):
        load_bundle(bundle)
    (bundle / "bundle.json").write_text("[1, 2, 3]")
    with pytest.raises(BundleError, match=r"bundle\.json: holds a JSON list, but .* an object"):
        load_bundle(bundle)


def test_weights_of_another_depth_are_refused_naming_weights_and_model_config(tmp_path):
    bundle = network_bundle(tmp_path)
    other = network_bundle(tmp_path / "other", depth=14)
    (bundle / "weights.pt").write_bytes((other / "weights.pt").read_bytes())
    with pytest.raises(
        BundleError, match=r"weights\.pt: does not fit model_config of .*unexpected"
    ):
        load_bundle(bundle)


def test_weights_for_another_class_count_are_refused(tmp_path):
    bundle = network_bundle(tmp_path)
    edit_meta(bundle, _set("model_config", "num_classes", value=5))
    edit_meta(bundle, _set("classes", value=list("abcde")))
    with pytest.raises(BundleError, match=r"weights\.pt: .*'fc\.(weight|bias)': \(3.*builds \(5"):
        load_bundle(bundle)


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any code in a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_payload_in_weights_is_never_run_and_never_advised(tmp_path):
    bundle = network_bundle(tmp_path)
    marker = tmp_path / "payload-ran"
    (bundle / "weights.pt").write_bytes(pickle.dumps({"fc.weight": _Payload(marker)}, protocol=2))
    with pytest.raises(BundleError, match=r"weights\.pt: is not a state_dict .*pickle") as err:
        load_bundle(bundle)
    assert not marker.exists()
    assert "weights_only=False" not in str(err.value) and "\n" not in str(err.value)


def test_truncated_weights_or_non_tensors_or_nan_are_refused(tmp_path):
    bundle = network_bundle(tmp_path)
    weights = bundle / "weights.pt"
    state = torch.load(weights, weights_only=True)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"weights\.pt: is not a state_dict of tensors"):
        load_bundle(bundle)
    torch.save([1, 2], weights)
    with pytest.raises(BundleError, match=r"weights\.pt: holds a list, not a state_dict"):
        load_bundle(bundle)
    torch.save({**state, "fc.bias": torch.full((3,), float("nan"))}, weights)
    with pytest.raises(BundleError, match=r"weights\.pt: 1 tensor\(s\) hold NaN .*'fc\.bias'"):
        load_bundle(bundle)


def test_svm_class_count_is_checked_against_the_fitted_classes(tmp_path):
    bundle = svm_bundle(tmp_path)
    edit_meta(bundle, _set("classes", value=["a", "b"]))
    with pytest.raises(
        BundleError, match=r"bundle\.json: classes holds 2 .* model\.skops scores 3"
    ):
        load_bundle(bundle)


def test_svm_fitted_on_other_images_than_the_features_give_is_refused(tmp_path):
    bundle = svm_bundle(tmp_path)
    edit_meta(bundle, _set("features", "size", value=[8, 12]))
    with pytest.raises(BundleError, match=r"bundle\.json: .*\(8, 12\), but the SVM .*\(16, 12\)"):
        load_bundle(bundle)


def test_a_truncated_or_replaced_model_skops_is_refused(tmp_path):
    import skops.io as sio
    from sklearn.preprocessing import StandardScaler

    bundle = svm_bundle(tmp_path)
    skops_file = bundle / "model.skops"
    saved = skops_file.read_bytes()
    skops_file.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(BundleError, match=r"model\.skops: is not an SVM .*BadZipFile"):
        load_bundle(bundle)
    sio.dump(StandardScaler().fit(np.ones((2, 2))), skops_file)
    with pytest.raises(BundleError, match=r"model\.skops: .*holds a StandardScaler, not an SVM"):
        load_bundle(bundle)
    skops_file.unlink()
    with pytest.raises(BundleError, match=r"model\.skops is missing"):
        load_bundle(bundle)


def test_export_without_the_onnx_extra_says_how_to_install_it(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from pipeline.errors import ConfigError
    from pipeline.tasks import export

    bundle = network_bundle(tmp_path)
    cfg = OmegaConf.create(
        {"export": {"model": str(bundle), "output": None, "check": False, "tolerance": 1e-4}}
    )
    monkeypatch.setitem(sys.modules, "onnx", None)  # how Python marks a module absent
    with pytest.raises(ConfigError, match=r'task=export needs onnx\b.*pip install -e "\.\[onnx\]"'):
        export.run(cfg, run_dir=tmp_path)
    assert not (tmp_path / "model.onnx").exists()
