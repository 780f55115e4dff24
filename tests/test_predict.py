"""Batch classification with a bundle from a tiny training run, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.special import softmax

from pipeline.errors import ConfigError
from tests.conftest import cli, read_csv, write_tone_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    data = write_tone_dataset(tmp / "tones")
    proc = cli(
        "data=folder",
        f"data.root={data}",
        "models=[resnet,svm]",
        "train.epochs=2",
        "train.min_steps=0",
        "train.batch_size=8",
        "features.n_fft=64",
        "features.hop_length=16",
        "features.win_length=64",
        "features.size=[16,16]",
        "svm.C=[1.0]",
        "svm.gamma=[scale]",
        "svm.cv=2",
        "train.amp=false",
        # trained and tested from the feature cache on disk, a batch at a time: the predict
        # tests below check its bundle and predictions against predict's own images
        "features.in_memory=false",
        f"hydra.run.dir={tmp / 'run'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "read a batch at a time from the feature cache" in (tmp / "run" / "run.log").read_text()
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet", "svm"])
def test_predict_gives_the_training_runs_test_predictions(trained, tmp_path, model):
    """One front end: every test window the training run scored gets the same class from
    task=predict, and a network the same probabilities (to the CSVs' six digits)."""
    run = trained / "run"
    proc = cli(
        "task=predict",
        f"predict.model={run / 'models' / model}",
        f"predict.input={trained / 'tones'}",
        "predict.segments=true",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "accuracy" in proc.stdout  # class folders name the bundle's classes
    files = {r["path"]: r for r in read_csv(tmp_path / "predictions.csv")}
    assert len(files) == 18
    windows = {
        (r["path"], r["start_seconds"]): r for r in read_csv(tmp_path / "predictions_segments.csv")
    }
    evaluated = read_csv(run / "predictions" / f"{model}.csv")
    classes = ["high", "low", "mid"]
    assert evaluated and all(e["path"] in files for e in evaluated)
    for e in evaluated:
        w = windows[(e["path"], e["segment_start_seconds"])]
        assert w["predicted"] == e["predicted"] and files[e["path"]]["true"] == e["true"]
        if model == "resnet":  # the SVM's CSV holds decision values, predict probabilities
            want = softmax(np.array([float(e[f"score_{c}"]) for c in classes]))
            got = np.array([float(w[c]) for c in classes])
            np.testing.assert_allclose(got, want, atol=5e-5)


@pytest.mark.slow
def test_a_messy_folder_is_classified_and_its_bad_files_reported(trained, tmp_path):
    folder = tmp_path / "incoming"
    (folder / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, where in enumerate([folder, folder / "a", folder / "a" / "b"]):
        sf.write(where / f"ok{i}.wav", (0.3 * rng.standard_normal(800)).astype(np.float32), 1000)
    (folder / "a" / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    (folder / "empty.wav").write_bytes(b"")
    np.save(folder / "a" / "b" / "nan.npy", np.full(500, np.nan))
    (folder / "notes.txt.bak").write_text("ignored")
    out = tmp_path / "out" / "labels.csv"
    args = [
        "task=predict",
        f"predict.model={trained / 'run' / 'models' / 'resnet'}",
        f"predict.input={folder}",
        f"predict.output={out}",
        "predict.segments=true",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_csv(out)
    assert sorted(Path(r["path"]).name for r in rows) == ["ok0.wav", "ok1.wav", "ok2.wav"]
    for r in rows:
        assert r["predicted"] in {"high", "low", "mid"} and r["true"] == ""
        assert int(r["n_segments"]) == 2  # 800 samples: a 500-sample window and a padded tail
        assert float(r["score_1"]) >= float(r["score_2"]) >= float(r["score_3"])
    errors = {
        Path(r["path"]).name: r["reason"] for r in read_csv(out.with_name("labels_errors.csv"))
    }
    assert set(errors) == {"corrupt.wav", "empty.wav", "nan.npy"}
    assert "NaN" in errors["nan.npy"]
    segments = read_csv(out.with_name("labels_segments.csv"))
    assert len(segments) == 6 and {s["start_seconds"] for s in segments} == {"0", "0.5"}
    again = cli(*args)
    assert again.returncode == 2 and "set predict.overwrite=true" in again.stdout + again.stderr
    assert cli(*args, "predict.overwrite=true").returncode == 0


@pytest.mark.slow
def test_nothing_classifiable_exits_non_zero(trained, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.wav").write_bytes(b"junk")
    proc = cli(
        "task=predict",
        f"predict.model={trained / 'run' / 'models' / 'resnet'}",
        f"predict.input={tmp_path / 'in'}",
        f"hydra.run.dir={tmp_path / 'h'}",
    )
    assert proc.returncode == 2
    assert "could be classified" in proc.stdout + proc.stderr


def peak_rss_mb(*overrides: str) -> float:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", *overrides, "progress=false"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return usage.ru_maxrss / 1024  # kilobytes on Linux


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kilobytes on Linux only")
def test_memory_does_not_grow_with_the_number_of_files(trained, tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"small": 2_000, "large": 20_000}
    for name, n in sizes.items():
        folder = tmp_path / name
        folder.mkdir()
        for i in range(n):
            np.save(folder / f"{i:05d}.npy", rng.standard_normal(500).astype(np.float32))
    peaks = {
        name: peak_rss_mb(
            "task=predict",
            f"predict.model={trained / 'run' / 'models' / 'resnet'}",
            f"predict.input={tmp_path / name}",
            f"predict.output={tmp_path / name}.csv",
            f"hydra.run.dir={tmp_path / 'h' / name}",
        )
        for name in sizes
    }
    with open(tmp_path / "large.csv") as f:
        assert sum(1 for _ in f) == 20_001
    # 10x the files: the process's peak may not grow by more than noise (oneDNN caches
    # kernels per batch shape, a few MB); holding every file's image would add 20 MB.
    assert peaks["large"] - peaks["small"] < 12, peaks
    # Python's own allocations (NumPy's included), measured exactly on 600 and 2,000
    # files (tracemalloc is slow): a list of the 1,400 extra paths alone adds about 0.25 MB.
    from pipeline.bundle import load_bundle
    from pipeline.tasks.predict import predict_folder

    bundle = load_bundle(trained / "run" / "models" / "resnet")
    (tmp_path / "tiny").mkdir()
    for path in sorted((tmp_path / "small").iterdir())[:600]:
        os.link(path, tmp_path / "tiny" / path.name)
    traced = {}
    for name in ("tiny", "small"):
        out = [tmp_path / f"t_{name}.csv", tmp_path / f"t_{name}_errors.csv"]
        tracemalloc.start()
        predict_folder(
            bundle,
            tmp_path / name,
            outputs=out,
            device=torch.device("cpu"),
            batch_size=256,
            top_k=3,
            rule="mean",
            progress=False,
            workers=0,
        )
        traced[name] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    assert traced["small"] - traced["tiny"] < 0.15, traced


@pytest.mark.slow
def test_export_to_onnx_matches_pytorch(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "resnet.onnx"
    proc = cli(
        "task=export",
        f"export.model={trained / 'run' / 'models' / 'resnet'}",
        "export.input=image",
        f"export.output={out}",
        f"hydra.run.dir={tmp_path / 'h'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checked with onnxruntime" in proc.stdout
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["classes"] == ["high", "low", "mid"]
    assert sidecar["input"]["shape"] == ["batch", 1, 16, 16]
    svm = cli(
        "task=export",
        f"export.model={trained / 'run' / 'models' / 'svm'}",
        f"hydra.run.dir={tmp_path / 'h2'}",
    )
    assert svm.returncode == 2 and "is an SVM bundle" in svm.stdout + svm.stderr


def test_reading_workers_keep_the_order_and_report_errors(tmp_path):
    from pipeline.features.stft import STFTParams
    from pipeline.frontend import Frontend, Segmenting
    from pipeline.runtime import reading_workers
    from pipeline.tasks.predict import WindowReader, read_files

    for i in range(23):
        folder = tmp_path / f"c{i % 3}"
        folder.mkdir(exist_ok=True)
        n = 3 if i == 7 else 400  # one file too short for a window
        np.save(folder / f"{i:02d}.npy", np.full(n, i + 1, np.float32))  # not all zero
    params = STFTParams(n_fft=32, hop_length=8, win_length=32)
    front = Frontend(sample_rate=100, segmenting=Segmenting(100, 100, pad=False), params=params)
    reader = WindowReader(front, channels=1)
    inline = list(read_files(tmp_path, reader, workers=0))
    parallel = list(read_files(tmp_path, reader, workers=2, chunk=4))
    assert [p for p, _ in parallel] == [p for p, _ in inline] and len(inline) == 23
    for (_, a), (path, b) in zip(inline, parallel, strict=True):
        if path.name == "07.npy":
            assert a == b and "3 samples is shorter than one window of 100 samples" in b
        else:
            assert np.array_equal(a, b) and b.shape == (4, 1, 100)
            assert b[0, 0, 0] == int(path.stem) + 1
    assert reading_workers("auto", key="predict.workers") >= 0
    assert reading_workers(3, key="predict.workers") == 3
    with pytest.raises(ConfigError, match="predict.workers=-1 must be auto or a whole number"):
        reading_workers(-1, key="predict.workers")


def write_speaker_dataset(root: Path, *, rate: int = 1000) -> Path:
    """Three tone classes said by three "speakers", each heard through its own hum:
    root/<speaker>/<class>_<speaker>_<i>.wav."""
    rng = np.random.default_rng(3)
    t = np.arange(rate // 2) / rate
    for speaker, hum in (("ann", 100.0), ("bob", 250.0), ("cy", 420.0)):
        (root / speaker).mkdir(parents=True)
        for label, freq in (("low", 60.0), ("mid", 180.0), ("high", 350.0)):
            for i in range(4):
                x = np.sin(2 * np.pi * (freq + rng.uniform(-10, 10)) * t)
                x += 0.8 * np.sin(2 * np.pi * hum * t) + 0.3 * rng.standard_normal(t.size)
                sf.write(
                    root / speaker / f"{label}_{speaker}_{i}.wav",
                    (0.3 * x).astype(np.float32),
                    rate,
                    subtype="FLOAT",
                )
    return root


@pytest.mark.slow
def test_compare_adapts_each_test_group_as_predict_does(tmp_path):
    """evaluate.adapt_bn=group in training's evaluation gives the probabilities of
    predict.adapt_bn=group on the same files, beside the plain figures."""
    data = write_speaker_dataset(tmp_path / "speakers")
    run = tmp_path / "run"
    # Batches larger than a speaker's 12 windows: both adapt each group in one batch.
    proc = cli(
        "data=folder",
        f"data.root={data}",
        "data.label_regex='^([a-z]+)_'",
        "data.group_regex='^[a-z]+_([a-z]+)_'",
        "data.split=group",
        "data.test_groups=[bob,cy]",
        "data.val_fraction=0",
        "features.n_fft=64",
        "features.hop_length=16",
        "features.win_length=64",
        "features.size=[16,16]",
        "models=[resnet,svm]",
        "svm.C=[1.0]",
        "svm.gamma=[scale]",
        "svm.cv=2",
        "train.epochs=2",
        "train.min_steps=0",
        "train.batch_size=64",
        "evaluate.adapt_bn=group",
        "train.precise_bn=false",
        "train.amp=false",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    resnet, svm = metrics["models"]["resnet"], metrics["models"]["svm"]
    assert resnet["adapt_bn"] == "group" and "adapt_bn" not in svm
    assert "adapted_accuracy" in resnet and "adapted_accuracy" not in svm
    # The bundle keeps the trained statistics, not the adapted ones: without precise BN those
    # of the last epoch's checkpoint.
    from pipeline.bundle import load_bundle

    saved = load_bundle(run / "models" / "resnet").model.state_dict()
    last = torch.load(run / "checkpoints" / "resnet.pt", weights_only=False)["model"]
    means = [k for k in saved if k.endswith("running_mean")]
    assert means and all(torch.equal(saved[k], last[k]) for k in means)
    report = (run / "report.md").read_text()
    assert "(`evaluate.adapt_bn=group`, AdaBN, without labels)" in report
    assert f"adapted accuracy {resnet['adapted_accuracy']:.4f} (plain " in report

    model = run / "models" / "resnet"
    for adapt, hydra_dir in (("group", "adapted"), ("false", "unadapted")):
        out = tmp_path / hydra_dir
        proc = cli(
            "task=predict",
            f"predict.model={model}",
            f"predict.input={data}",
            f"predict.adapt_bn={adapt}",
            "predict.amp=false",
            f"hydra.run.dir={out}",
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        rows = {r["path"]: r for r in read_csv(out / "predictions.csv")}
        tested = [r for p, r in rows.items() if Path(p).parent.name in ("bob", "cy")]
        # the class is the file name's first word (the folders are speakers)
        accuracy = np.mean([r["predicted"] == Path(r["path"]).name.split("_")[0] for r in tested])
        if adapt == "false":  # one window per file: file and window accuracy agree
            assert len(tested) == 24
            assert accuracy == pytest.approx(resnet["accuracy"])
            continue
        assert accuracy == pytest.approx(resnet["adapted_accuracy"])
        evaluated = read_csv(run / "predictions" / "resnet_adapted.csv")
        assert len(evaluated) == 24
        for e in evaluated:
            probs = softmax(np.array([float(e[f"score_{c}"]) for c in ("high", "low", "mid")]))
            assert float(rows[e["path"]]["confidence"]) == pytest.approx(probs.max(), rel=1e-4)
            assert rows[e["path"]]["predicted"] == e["predicted"]


@pytest.mark.slow
def test_per_group_profiles_in_predict_equal_those_of_training(tmp_path):
    data = write_speaker_dataset(tmp_path / "speakers")
    common = [
        "data=folder",
        f"data.root={data}",
        "data.label_regex='^([a-z]+)_'",
        "data.split=group",
        "data.test_groups=[cy]",
        "data.val_fraction=0",
        "features.n_fft=64",
        "features.hop_length=16",
        "features.win_length=64",
        "features.size=[16,16]",
        "features.per_group=freq",
    ]
    proc = cli(*common, f"hydra.run.dir={tmp_path / 'none'}")
    assert proc.returncode != 0
    assert "features.per_group=freq needs each file's group" in proc.stdout + proc.stderr

    run = tmp_path / "run"
    proc = cli(
        *common,
        "data.group_regex='^[a-z]+_([a-z]+)_'",
        "models=[resnet]",
        "train.epochs=2",
        "train.min_steps=0",
        "train.batch_size=8",
        "train.amp=false",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "each of 3 groups' mean frequency profile removed" in (run / "run.log").read_text()
    out = tmp_path / "predicted"
    # The held-out speaker's folder: its profile comes from its own files, as in training,
    # with the group read by the training run's data.group_regex from the bundle.
    proc = cli(
        "task=predict",
        f"predict.model={run / 'models' / 'resnet'}",
        f"predict.input={data / 'cy'}",
        "predict.amp=false",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "profiles of 1 group(s) from the input: 'cy'" in (out / "run.log").read_text()
    rows = {r["path"]: r for r in read_csv(out / "predictions.csv")}
    evaluated = read_csv(run / "predictions" / "resnet.csv")
    assert len(rows) == len(evaluated) == 12
    classes = ["high", "low", "mid"]
    for e in evaluated:
        scores = softmax(np.array([float(e[f"score_{c}"]) for c in classes]))
        p = rows[e["path"]]
        assert p["predicted"] == e["predicted"]
        assert float(p["confidence"]) == pytest.approx(scores.max(), rel=1e-3)
    # Grouped otherwise (by take number: four groups of three), the files score differently.
    proc = cli(
        "task=predict",
        f"predict.model={run / 'models' / 'resnet'}",
        f"predict.input={data / 'cy'}",
        r"predict.group_regex='_(\d+)\.wav$'",
        f"hydra.run.dir={tmp_path / 'regrouped'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    regrouped = read_csv(tmp_path / "regrouped" / "predictions.csv")
    unmatched = cli(
        "task=predict",
        f"predict.model={run / 'models' / 'resnet'}",
        f"predict.input={data / 'cy'}",
        "predict.group_regex='^(none)'",
        f"hydra.run.dir={tmp_path / 'unmatched'}",
    )
    assert unmatched.returncode == 0, unmatched.stdout + unmatched.stderr
    assert "12 file(s) match no group_regex ('^(none)') and form one group" in unmatched.stdout
    assert [r["confidence"] for r in regrouped] != [
        rows[r["path"]]["confidence"] for r in regrouped
    ]
    # With the batch-norm adaptation too: one pass gives both, and the adapted statistics are
    # those of the group's images with its profile removed (AdaBN by hand, one batch).
    out = tmp_path / "adapted"
    proc = cli(
        "task=predict",
        f"predict.model={run / 'models' / 'resnet'}",
        f"predict.input={data / 'cy'}",
        "predict.adapt_bn=group",
        "predict.amp=false",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log_text = (out / "run.log").read_text()
    assert "profiles of 1 group(s) from the input: 'cy'" in log_text
    assert "batch-norm statistics of 1 group(s) from the input: 'cy'" in log_text
    adapted = {r["path"]: r for r in read_csv(out / "predictions.csv")}
    from pipeline.bundle import load_bundle
    from pipeline.tasks.predict import Classifier

    classify = Classifier(
        load_bundle(run / "models" / "resnet"), device=torch.device("cpu"), amp=False
    )
    read = _reader(classify.bundle)
    files = sorted((data / "cy").glob("*.wav"))
    windows = [read(f) for f in files]
    with torch.no_grad():
        images = classify.images(np.concatenate(windows))
        profile = images.mean(dim=3).mean(dim=0)[..., None]  # (channels, height, 1)
        for m in classify.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = 1.0
        classify.model.train()
        classify.model(images - profile)
        classify.model.eval()
    for f, w in zip(files, windows, strict=True):
        probs = classify(w, (profile[None].expand(len(w), -1, -1, -1)).numpy()).mean(axis=0)
        assert float(adapted[str(f)]["confidence"]) == pytest.approx(probs.max(), rel=1e-4)
    assert [r["confidence"] for r in adapted.values()] != [rows[p]["confidence"] for p in adapted]


def test_files_a_group_regex_does_not_match_share_one_group():
    import re

    from pipeline.tasks.predict import file_group

    pattern = re.compile(r"^\d+_([a-z]+)_")
    assert file_group(Path("/x/7_jackson_3.wav"), pattern) == "jackson"
    assert file_group(Path("/x/recording.wav"), pattern) == ""
    assert file_group(Path("/x/7_jackson_3.wav"), None) == ""


def _reader(bundle):
    from pipeline.frontend import Frontend
    from pipeline.tasks.predict import WindowReader

    channels = int(bundle.meta["model_config"]["in_channels"])
    return WindowReader(Frontend.from_bundle(bundle), channels)


def test_adapt_bn_weights_every_image_alike_and_restores_the_model(trained, caplog):
    import re

    from pipeline.adapt import ADAPT_WINDOWS, batchnorm_state
    from pipeline.bundle import load_bundle
    from pipeline.tasks.predict import Classifier, adapt_batchnorm, group_pass

    def adapt(loaded, keep=ADAPT_WINDOWS):
        seen = group_pass(classify, iter(loaded), pattern, keep=keep, progress=False)
        return adapt_batchnorm(classify, seen, pattern, profiles=None, batch_size=4)

    bundle = load_bundle(trained / "run" / "models" / "resnet")
    classify = Classifier(bundle, device=torch.device("cpu"), amp=False)
    read = _reader(bundle)
    files = sorted((trained / "tones").rglob("*.wav"))
    loaded = [(f, read(f)) for f in files]
    before = batchnorm_state(classify.model)
    pattern = re.compile(r"^([a-z]+)_")  # the class as the group: three groups of six files
    # Batches of 4 windows: each group's statistics are folded in over several batches.
    states = adapt(loaded)
    assert sorted(states) == ["high", "low", "mid"]
    after = batchnorm_state(classify.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bundle's own are back
    # The first batch norm sees the stem convolution's output, which no statistic changes:
    # its running mean must be the mean over all the group's images, each weighted alike.
    stem = classify.model.stem
    conv = next(m for m in stem.modules() if isinstance(m, torch.nn.Conv2d))
    bn = next(n for n, m in classify.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    for group in states:
        windows = np.concatenate([w for f, w in loaded if f.name.startswith(group + "_")])
        with torch.no_grad():
            out = conv(classify.images(windows))  # (n, channels, H, W)
        expected = out.mean(dim=(0, 2, 3))
        torch.testing.assert_close(states[group][f"{bn}.running_mean"], expected, atol=1e-5, rtol=0)
        assert not torch.allclose(states[group][f"{bn}.running_mean"], before[f"{bn}.running_mean"])
    # The file order does not matter to that mean; beyond ADAPT_WINDOWS a random sample is used.
    backwards = adapt(loaded[::-1])
    for group in states:
        torch.testing.assert_close(
            backwards[group][f"{bn}.running_mean"], states[group][f"{bn}.running_mean"]
        )
    with caplog.at_level("INFO", logger="pipeline.tasks.predict"):
        sampled = adapt(loaded, keep=4)
    assert sorted(sampled) == sorted(states)
    # The reservoir holds 4 of each group's windows, each as likely as any other.
    seen = group_pass(classify, iter(loaded), pattern, keep=4, progress=False)
    assert all(len(seen.kept[g]) == 4 < seen.windows[g] for g in states)
    assert "3 group(s) have more than 4 windows; a random 4 of each" in caplog.text


@pytest.mark.slow
def test_predict_adapt_bn_classifies_each_group_with_its_own_statistics(trained, tmp_path):
    from pipeline.bundle import load_bundle
    from pipeline.tasks.predict import Classifier

    model = trained / "run" / "models" / "resnet"
    common = [
        "task=predict",
        f"predict.model={model}",
        f"predict.input={trained / 'tones'}",
        "predict.amp=false",
    ]
    proc = cli(
        *common,
        r"predict.group_regex='_0(\d)\.wav$'",
        "predict.adapt_bn=group",
        f"hydra.run.dir={tmp_path / 'adapted'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log_text = (tmp_path / "adapted" / "run.log").read_text()
    assert "batch-norm statistics of 6 group(s) from the input: '0', '1'" in log_text
    rows = {r["path"]: r for r in read_csv(tmp_path / "adapted" / "predictions.csv")}
    assert len(rows) == 18
    # The reference: AdaBN by hand, each group's windows in one batch in training mode.
    bundle = load_bundle(model)
    classify = Classifier(bundle, device=torch.device("cpu"), amp=False)
    read = _reader(bundle)
    trained_state = {k: v.clone() for k, v in classify.model.state_dict().items()}
    for take in range(6):
        files = sorted((trained / "tones").rglob(f"*_0{take}.wav"))
        windows = [read(f) for f in files]
        classify.model.load_state_dict(trained_state)
        for m in classify.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = 1.0
        classify.model.train()
        with torch.no_grad():
            classify.model(classify.images(np.concatenate(windows)))
        classify.model.eval()
        for f, w in zip(files, windows, strict=True):
            probs = classify(w).mean(axis=0)
            assert float(rows[str(f)]["confidence"]) == pytest.approx(probs.max(), rel=1e-4)
            assert rows[str(f)]["predicted"] == bundle.classes[int(probs.argmax())]
    # Without a group_regex (the bundle has none) the whole input is one group, with a warning;
    # an SVM has no batch norm to adapt; a wrong value names the key.
    one = cli(*common, "predict.adapt_bn=group", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stdout + one.stderr
    assert "18 file(s) have no group_regex and form one group" in one.stdout + one.stderr
    svm = cli(
        "task=predict",
        f"predict.model={trained / 'run' / 'models' / 'svm'}",
        f"predict.input={trained / 'tones'}",
        "predict.adapt_bn=group",
        f"hydra.run.dir={tmp_path / 'svm'}",
    )
    assert svm.returncode == 0, svm.stdout + svm.stderr
    assert "predict.adapt_bn=group is not used" in svm.stdout + svm.stderr
    bad = cli(*common, "predict.adapt_bn=speaker", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode != 0
    assert "predict.adapt_bn='speaker' must be false or group" in bad.stdout + bad.stderr
    bad = cli(*common[:-1], "predict.amp=bf16", f"hydra.run.dir={tmp_path / 'bad-amp'}")
    assert bad.returncode != 0
    assert "predict.amp='bf16' must be null (as the model was trained" in bad.stdout + bad.stderr


def test_predict_amp_follows_the_bundle_unless_set_and_reaches_every_forward_pass(
    trained, tmp_path, monkeypatch
):
    import re

    from pipeline import adapt
    from pipeline.bundle import load_bundle
    from pipeline.errors import ConfigError
    from pipeline.models import base
    from pipeline.tasks import predict

    bundle = load_bundle(trained / "run" / "models" / "resnet")
    assert bundle.meta["amp"] is False  # trained with train.amp=false
    assert predict.bundle_amp(None, bundle) is False
    assert predict.bundle_amp(True, bundle) is True
    del bundle.meta["amp"]  # saved before train.amp was recorded: its default
    assert predict.bundle_amp(None, bundle) is True
    with pytest.raises(ConfigError, match="predict.amp='bf16' must be null"):
        predict.check_amp("bf16")

    calls = []
    real = base.autocast

    def spy(where):
        def autocast(device, enabled):
            calls.append((where, enabled))
            return real(device, enabled)

        return autocast

    monkeypatch.setattr(base, "autocast", spy("classify"))  # the network's forward pass
    monkeypatch.setattr(adapt, "autocast", spy("adapt"))
    for amp in (True, False):
        calls.clear()
        outputs = [tmp_path / f"{amp}.csv", tmp_path / f"{amp}_errors.csv"]
        predict.predict_folder(
            bundle,
            trained / "tones",
            outputs=outputs,
            device=torch.device("cpu"),
            batch_size=8,
            top_k=2,
            rule="mean",
            progress=False,
            workers=0,
            group_pattern=re.compile(r"^([a-z]+)_"),
            adapt_bn=True,
            amp=amp,
        )
        assert {where for where, _ in calls} == {"classify", "adapt"}
        assert all(enabled is amp for _, enabled in calls)
