"""task=export: the waveform-in graph against task=predict on real WAV files, the image graph,
int8 quantisation, the deployment example without torch, and the bad settings."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from pipeline.errors import BundleError, ConfigError
from pipeline.features.stft import STFTParams, compute_images
from pipeline.frontend import Frontend, Segmenting, WindowNorm
from pipeline.onnx_frontend import ImageFront, RawFront
from tests.conftest import REPO, cli, read_csv, write_tone_dataset
from tests.test_bench import ratio_agrees

pytest.importorskip("onnxruntime")
EXAMPLE = REPO / "docs" / "examples" / "onnx_classify.py"
TOLERANCE = 1e-4  # export.tolerance's default: float32 probabilities
CLASSES = ["high", "low", "mid"]


def example():
    spec = importlib.util.spec_from_file_location("onnx_classify", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_stereo_tones(root: Path, *, n_per_class: int = 6, rate: int = 1000) -> Path:
    """Three classes of tones as two-channel WAV files: the tone on both channels, at
    different levels, with each channel's own noise; 0.75 s, so several windows each."""
    rng = np.random.default_rng(1)
    t = np.arange(int(rate * 0.75)) / rate
    for label, freq in (("low", 60.0), ("mid", 180.0), ("high", 350.0)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            tone = np.sin(2 * np.pi * (freq + rng.uniform(-10, 10)) * t)
            x = np.stack([tone, 0.4 * tone]) + 0.4 * rng.standard_normal((2, t.size))
            sf.write(root / label / f"{label}_{i:02d}.wav", (0.3 * x.T).astype(np.float32), rate)
    return root


CASES = {
    "stft-mono": (
        write_tone_dataset,
        ["features.n_fft=64", "features.hop_length=16", "features.win_length=64"],
    ),
    "mel-stereo": (
        write_stereo_tones,
        [
            "features=mel",
            "features.n_fft=64",
            "features.hop_length=8",
            "features.win_length=64",
            "features.n_mels=12",
            "features.per_image=true",
            "data.channels=all",
            "data.segment.length_seconds=0.25",
            "data.segment.hop_seconds=0.125",
        ],
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory) -> SimpleNamespace:
    """A tiny ResNet trained on real WAV files, exported waveform-in (checked on those
    files, with an int8 copy), and task=predict's float32 output on the same files."""
    tmp = tmp_path_factory.mktemp(request.param)
    write, features = CASES[request.param]
    data = write(tmp / "data")
    train = cli(
        "data=folder",
        f"data.root={data}",
        "models=[resnet]",
        "resnet.depth=8",
        "train.epochs=2",
        "train.min_steps=0",
        "train.batch_size=8",
        "features.size=[16,16]",
        *features,
        "train.amp=false",
        f"hydra.run.dir={tmp / 'run'}",
    )
    assert train.returncode == 0, train.stdout + train.stderr
    bundle = tmp / "run" / "models" / "resnet"
    graph = tmp / "graph" / "model.onnx"
    export = cli(
        "task=export",
        f"export.model={bundle}",
        f"export.output={graph}",
        f"export.check_input={data}",
        "export.quantize=dynamic",
        f"hydra.run.dir={tmp / 'export'}",
    )
    assert export.returncode == 0, export.stdout + export.stderr
    predict = cli(
        "task=predict",
        f"predict.model={bundle}",
        f"predict.input={data}",
        "predict.amp=false",
        "predict.segments=true",
        f"hydra.run.dir={tmp / 'predict'}",
    )
    assert predict.returncode == 0, predict.stdout + predict.stderr
    return SimpleNamespace(
        name=request.param, data=data, bundle=bundle, graph=graph, export=export, tmp=tmp
    )


@pytest.mark.slow
def test_the_graph_gives_predicts_probabilities_on_real_wav_files(case):
    import onnxruntime

    meta = json.loads(case.graph.with_suffix(".json").read_text())
    bundle = json.loads((case.bundle / "bundle.json").read_text())
    channels = 2 if case.name == "mel-stereo" else 1
    length = bundle["data"]["segment_samples"]
    assert meta["graph"] == "waveform" and meta["classes"] == CLASSES
    assert meta["input"] == {
        **meta["input"],
        "name": "waveform",
        "shape": ["batch", channels, length],
    }
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "logits"]
    assert meta["window_samples"] == length
    assert meta["hop_samples"] == bundle["data"]["hop_samples"]
    assert meta["sample_rate"] == 1000 and meta["channels"] == bundle["data"]["channels"]

    ex = example()
    session = onnxruntime.InferenceSession(str(case.graph), providers=["CPUExecutionProvider"])
    segments = read_csv(case.tmp / "predict" / "predictions_segments.csv")
    by_file: dict[str, list[dict]] = {}
    for row in segments:
        by_file.setdefault(row["path"], []).append(row)
    assert len(by_file) == 18
    assert len(segments) == 18 if case.name == "stft-mono" else len(segments) > 3 * 18
    worst = 0.0
    for path, rows in by_file.items():
        x = ex.windows(
            ex.read(Path(path), meta),
            length=length,
            hop=meta["hop_samples"],
            pad=meta["pad"],
        )
        probs, logits = session.run(["probabilities", "logits"], {"waveform": x})
        want = np.array([[float(r[c]) for c in CLASSES] for r in rows])
        assert probs.shape == want.shape
        worst = max(worst, float(np.abs(probs - want).max()))
        assert [CLASSES[i] for i in probs.argmax(1)] == [r["predicted"] for r in rows]
        np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits), 1), atol=1e-6)
    assert worst < TOLERANCE, worst


@pytest.mark.slow
def test_the_export_states_its_parity_and_the_int8_graphs_size_and_accuracy(case):
    out = case.export.stdout
    checked = re.search(
        r"checked with onnxruntime against the predict path \(float32\) on 18 file\(s\) under "
        r".*: max \|difference\| of probabilities ([\d.e+-]+) \(export.tolerance 0.0001\); "
        r"0 of (\d+) window labels and 0 of 18 file labels differ",
        out,
    )
    assert checked, out
    assert float(checked.group(1)) < TOLERANCE
    int8 = case.graph.with_name("model.int8.onnx")
    assert int8.stat().st_size < 0.6 * case.graph.stat().st_size
    assert json.loads(int8.with_suffix(".json").read_text())["quantized"].startswith("dynamic")
    line = re.search(
        r"int8: .*model\.int8\.onnx \((\d+) KiB against float32's (\d+) KiB\); labels agree "
        r"with float32's on (\d+) of (\d+) windows and (\d+) of 18 files; file accuracy "
        r"([\d.]+) against float32's ([\d.]+) on 18 labelled file\(s\)",
        out,
    )
    assert line, out
    assert int(line.group(1)) == round(int8.stat().st_size / 1024)
    assert int(line.group(4)) == int(checked.group(2))
    float32 = [r for r in read_csv(case.tmp / "predict" / "predictions.csv")]
    accuracy = np.mean([r["predicted"] == r["true"] for r in float32])
    assert float(line.group(7)) == pytest.approx(accuracy, abs=1e-4)


@pytest.mark.slow
def test_the_deployment_example_needs_no_torch_and_gives_predicts_labels(case):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(EXAMPLE), str(case.graph), str(case.data)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "onnxruntime" in imported and "soundfile" in imported
    banned = [m for m in imported if m.split(".")[0] in ("torch", "torchaudio", "pipeline")]
    assert not banned, banned
    got = {r["path"]: r["label"] for r in csv.DictReader(io.StringIO(proc.stdout))}
    want = {r["path"]: r["predicted"] for r in read_csv(case.tmp / "predict" / "predictions.csv")}
    assert len(want) == 18 and got == want


@pytest.mark.slow
def test_the_image_graph_is_still_available(case, tmp_path):
    if case.name != "stft-mono":
        pytest.skip("one bundle is enough")
    out = tmp_path / "image.onnx"
    proc = cli(
        "task=export",
        f"export.model={case.bundle}",
        "export.input=image",
        f"export.output={out}",
        f"hydra.run.dir={tmp_path / 'h'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max |difference| of logits" in proc.stdout
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["graph"] == "image" and meta["input"]["shape"] == ["batch", 1, 16, 16]
    assert meta["normalizer"] == json.loads((case.bundle / "bundle.json").read_text())["normalizer"]


# -- in-process: the front end module, bad settings, refusals, temperature ----------------------


def tiny_bundle(tmp_path: Path, *, extra: dict | None = None, **normalise) -> Path:
    from pipeline.bundle import save_bundle
    from pipeline.models.resnet import build_resnet

    rng = np.random.default_rng(0)
    params = STFTParams(n_fft=32, hop_length=8, win_length=32, size=(8, 8), sample_rate=400)
    x = (0.2 * rng.standard_normal((12, 1, 200))).astype(np.float32)
    front = Frontend(sample_rate=400, segmenting=Segmenting(200, 200, True), params=params)
    front = front.fitted(compute_images(x, params, progress=False), **normalise)
    torch.manual_seed(0)
    net = build_resnet(num_classes=3, in_channels=1, depth=8, shortcut="A").eval()
    return save_bundle(tmp_path / "net", net, classes=CLASSES, frontend=front, extra=extra)


def export_cfg(bundle: Path, tmp_path: Path, **export) -> object:
    settings = {"model": str(bundle), "output": str(tmp_path / "g" / "model.onnx")}
    settings |= {"check": True, "tolerance": 1e-4, **export}
    return OmegaConf.create({"export": settings})


PARAMS = [
    {},
    {"size": (16, 16)},
    {"n_mels": 20, "size": (16, 16)},
    {"n_mels": 20, "lifter": 8, "size": (10, 10), "mel_scale": "slaney", "norm": "slaney"},
    {"power": 1, "scale": "log1p", "win_length": 48, "f_min": 50.0, "f_max": 300.0},
    {"window": "hamming", "pad_mode": "constant", "size": (7, 9)},
    {"window": "blackman", "pad_mode": "replicate", "top_db": None},
    {"window": "rectangular", "pad_mode": "circular", "scale": "power"},
    {"center": False, "scale": "magnitude", "top_db": None},
]


@pytest.mark.parametrize("settings", PARAMS)
@pytest.mark.parametrize(
    "normalise", [{}, {"per_image": True}, {"mode": "per_freq", "per_image": "freq"}]
)
def test_the_front_end_module_computes_predicts_images(settings, normalise):
    rng = np.random.default_rng(0)
    rate, length = 1000, 500
    base = {"n_fft": 64, "hop_length": 16, "win_length": 64, "sample_rate": rate}
    params = STFTParams(**{**base, **settings})
    t = np.arange(length) / rate
    tone = np.sin(2 * np.pi * rng.uniform(20, 400, (24, 2, 1)) * t)
    x = (0.3 * tone + 0.1 * rng.standard_normal((24, 2, length))).astype(np.float32)
    front = Frontend(sample_rate=rate, segmenting=Segmenting(length, length, True), params=params)
    front = front.fitted(compute_images(x, params, progress=False), **normalise)
    want = front.images(x)
    got = ImageFront(front)(torch.from_numpy(x))
    assert got.shape == want.shape
    # float32 rounding of a DFT as a sum against the FFT's: the largest on dB pixels near
    # the top_db floor, where a bin is 1e-4 of the peak's amplitude
    assert float((got - want).abs().max()) < 1e-3


@pytest.mark.parametrize("mode", ["window", "global"])
def test_the_raw_front_standardises_as_window_norm(mode):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, 300)).astype(np.float32) * 3 + 1
    x[0] = 0.7  # a constant window: zeros, not rounding noise
    norm = WindowNorm.fit(x, mode=mode)
    got = RawFront(norm)(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), norm(torch.from_numpy(x)).numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("input", "foo", r"export\.input='foo' must be waveform .* or image"),
        ("quantize", "foo", r"export\.quantize='foo' must be null .* or dynamic"),
        ("check_windows", 0, r"export\.check_windows=0 must be a positive integer"),
        ("check_input", "/no/such/folder", r"export\.check_input='/no/such/folder' does not"),
    ],
)
def test_bad_settings_are_refused_in_one_sentence(tmp_path, key, value, message):
    from pipeline.tasks import export

    with pytest.raises(ConfigError, match=message):
        export.run(export_cfg(tmp_path / "none", tmp_path, **{key: value}), run_dir=tmp_path)


@pytest.mark.slow
def test_a_bad_export_input_exits_2_with_one_line(tmp_path):
    proc = cli("task=export", f"export.model={tmp_path}", "export.input=foo")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert "export.input='foo' must be waveform" in out


def test_a_per_group_bundle_is_refused_waveform_in(tmp_path):
    from pipeline.tasks import export

    bundle = tiny_bundle(tmp_path, per_group="freq")
    with pytest.raises(BundleError, match=r"features\.per_group=freq.*export\.input=image"):
        export.run(export_cfg(bundle, tmp_path), run_dir=tmp_path)
    assert not (tmp_path / "g" / "model.onnx").exists()


def test_the_temperature_divides_the_logits_before_the_softmax(tmp_path):
    import onnxruntime

    from pipeline.tasks import export

    bundle = tiny_bundle(tmp_path, extra={"temperature": 2.5})
    result = export.run(export_cfg(bundle, tmp_path), run_dir=tmp_path)  # predict divides too
    assert result["checked"] and result["max_abs_diff"] < TOLERANCE
    graph = tmp_path / "g" / "model.onnx"
    assert json.loads(graph.with_suffix(".json").read_text())["temperature"] == 2.5
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 1, 200)).astype(np.float32)
    x[0] = 1e30  # its power spectrum overflows float32: NaN, which predict reports as an error
    probs, logits = session.run(["probabilities", "logits"], {"waveform": x})
    assert np.isnan(probs[0]).all() and np.isfinite(probs[1:]).all()
    want = torch.softmax(torch.from_numpy(logits[1:]) / 2.5, 1).numpy()
    np.testing.assert_allclose(probs[1:], want, atol=1e-6)


def test_an_unfaithful_export_is_removed(tmp_path):
    from pipeline.tasks import export

    bundle = tiny_bundle(tmp_path)
    with pytest.raises(BundleError, match=r"differ from the predict path's by .* removed"):
        export.run(export_cfg(bundle, tmp_path, tolerance=1e-12), run_dir=tmp_path)
    assert not any((tmp_path / "g").iterdir())
    # the same export within the default tolerance passes, on generated test signals
    result = export.run(export_cfg(bundle, tmp_path), run_dir=tmp_path)
    assert result["checked"] and result["max_abs_diff"] < TOLERANCE and result["windows"] == 47
    assert result["refused_differ"] == 0  # the 1e30 window: NaN from both


def test_the_predict_benchmark_times_the_onnx_graph(capsys):
    from pipeline.bench.__main__ import main

    assert main(["predict", "--files", "24", "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rates = {k: float(v) for k, v in re.findall(r"(pipeline|bare|onnx)\s+([\d.]+) files/s", out)}
    assert set(rates) == {"pipeline", "bare", "onnx"} and all(v > 0 for v in rates.values())
    ratio = float(re.search(r"ratio onnx/pipeline: ([\d.]+)", out).group(1))
    assert ratio_agrees(ratio, rates["onnx"], rates["pipeline"])
