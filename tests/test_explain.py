"""Grad-CAM maps, the occlusion check and the gallery of mistakes (pipeline.explain)."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import explain
from pipeline.errors import ConfigError, config_keys
from pipeline.fit import TrainSettings, fit
from pipeline.models.resnet import build_resnet
from tests.conftest import cli, read_csv
from tests.test_report import CHROMIUM

# Three classes of 48 x 16 noise images (row 0: the lowest frequency): "tone" carries a
# steady line in rows 8-14, "clicks" three short bursts in rows 30-36, "noise" nothing. A
# network with a global pool cannot tell where a band is, only what is in it, so each class
# has its own pattern, in its own band.
BANDS = {0: (8, 14), 1: (30, 36)}
CLASSES = ["tone", "clicks", "noise"]
HEIGHT, WIDTH = 48, 16
CPU = torch.device("cpu")


def band_images(n_per_class: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(n, 1, HEIGHT, WIDTH) images of the three classes and their classes (n,)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3 * n_per_class, 1, HEIGHT, WIDTH)).astype(np.float32)
    y = np.repeat(np.arange(3), n_per_class)
    lo, hi = BANDS[0]
    x[y == 0, :, lo:hi] += 2.0
    lo, hi = BANDS[1]
    for i in np.flatnonzero(y == 1):
        for t in rng.choice(WIDTH - 1, size=3, replace=False):
            x[i, :, lo:hi, t : t + 2] += 3.0
    return torch.from_numpy(x), y


@pytest.fixture(scope="module")
def trained():
    """A ResNet-8 (half width) trained for a few epochs on the band images, with its test
    images."""
    x, y = band_images(30, seed=0)
    torch.manual_seed(0)
    net = build_resnet(arch="cifar", depth=8, width=0.5, num_classes=3, in_channels=1)
    settings = TrainSettings(
        epochs=6, batch_size=18, optimizer="adamw", lr=0.01, milestones=(0.7,), monitor="last"
    )
    empty = torch.empty(0, 1, HEIGHT, WIDTH), torch.empty(0, dtype=torch.long)
    fit(net, x, torch.from_numpy(y), *empty, settings=settings, device=CPU, seed=0)
    x_test, y_test = band_images(8, seed=1)
    accuracy = float((net.eval()(x_test).argmax(1).numpy() == y_test).mean())
    assert accuracy > 0.9, accuracy  # the property below needs a network that learnt the task
    return net.eval(), x_test, y_test


def test_grad_cam_of_each_class_peaks_in_the_band_that_carries_it(trained):
    net, x, y = trained
    layer = explain.cam_layer(net)
    assert layer is net.layers[-1]
    maps = explain.grad_cam(net, layer, x, y, device=CPU)
    assert maps.shape == (len(x), HEIGHT, WIDTH)
    assert maps.min() >= 0 and np.allclose(maps.reshape(len(x), -1).max(1), 1.0)
    profiles = explain.class_means(maps, y, 3).mean(axis=-1)  # (3, HEIGHT)
    for c, (lo, hi) in BANDS.items():
        peak = int(profiles[c].argmax())
        assert lo <= peak < hi, (CLASSES[c], peak, profiles[c].round(2))
        band_lo, band_hi = explain.peak_band(profiles[c])
        assert band_lo <= peak < band_hi and band_hi - band_lo < HEIGHT // 3


def test_masking_the_top_band_lowers_the_class_score_more_than_a_random_band(trained):
    net, x, y = trained
    maps = explain.grad_cam(net, explain.cam_layer(net), x, y, device=CPU)
    check = explain.occlusion_check(net, x, y, maps, device=CPU, seed=0)
    assert check["images"] == len(x) and check["band_rows"] == HEIGHT // 8
    assert check["top_drop"] > check["random_drop"] + 0.1, check
    assert check["top_larger"] > 0.5, check


def test_grad_cam_leaves_the_weights_gradients_and_mode_alone(trained):
    net, x, y = trained
    before = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    net.train()
    explain.grad_cam(net, explain.cam_layer(net), x[:4], y[:4], device=CPU)
    assert net.training
    net.eval()
    for p, g in zip(net.parameters(), before, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


def test_grad_cam_keeps_only_the_explained_layers_head_for_its_backward_pass(trained):
    net, x, y = trained
    layer = explain.cam_layer(net)
    sizes = {}

    def measure(_module, _inputs, out):
        sizes.setdefault("a", out.nbytes)

    hook = layer.register_forward_hook(measure)
    saved = []

    def pack(t):
        saved.append(t.nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        maps = explain.grad_cam(net, layer, x[:8], y[:8], device=CPU, batch_size=8)
    hook.remove()
    assert maps.shape == (8, HEIGHT, WIDTH)
    # The pool and the classifier save about A itself; the layers before it saved nothing
    # (their whole graph was many times A: at 128x64 images, 2 GB for a batch of 64).
    assert sum(saved) <= 2 * sizes["a"], (sum(saved), sizes["a"])
    assert all(p.requires_grad for p in net.parameters())


def test_network_maps_give_each_class_its_peak_band_in_hz(trained):
    net, x, y = trained
    edges = np.linspace(0.0, 100.0 * HEIGHT, HEIGHT + 1)  # 100 Hz a row
    settings = explain.ExplainSettings(images_per_class=5, occlusion_per_class=2)
    summary, maps = explain.network_maps(
        net, x, y, classes=CLASSES, edges_hz=edges, settings=settings, device=CPU
    )
    assert summary["layer"] == "layers.2" and summary["images"] == 15
    assert summary["occlusion"]["images"] == 6
    assert maps.shape == (3, HEIGHT, WIDTH)
    for name in CLASSES:
        c = summary["classes"][name]
        assert c["images"] == 5 and len(c["profile"]) == HEIGHT
        assert c["peak_hz"] == [100.0 * c["peak_rows"][0], 100.0 * c["peak_rows"][1]]
    for k, (lo, hi) in BANDS.items():  # the band the class's peak band lies on
        peak = summary["classes"][CLASSES[k]]["peak_hz"]
        assert peak[0] < 100.0 * hi and peak[1] > 100.0 * lo, (CLASSES[k], peak)


def test_no_map_for_models_without_a_convolutional_stage():
    from pipeline.models.resnet1d import build_resnet1d
    from pipeline.models.svm import SVMClassifier

    assert "not a network" in explain.no_map_reason(SVMClassifier())
    assert "raw window" in explain.no_map_reason(build_resnet1d(num_classes=2, filters=[4]))
    assert explain.no_map_reason(build_resnet(arch="cifar", depth=8, num_classes=2)) is None


def test_the_gallery_lists_exactly_the_misclassified_windows():
    rng = np.random.default_rng(3)
    n, classes = 60, ["a", "b", "c", "d"]
    y = rng.integers(0, 4, n)
    probs = rng.dirichlet(np.ones(4), n)
    predicted = probs.argmax(1)
    wrong = set(np.flatnonzero(predicted != y).tolist())
    assert 0 < len(wrong) < n
    paths = [f"f{i}.wav" for i in range(n)]
    starts = np.arange(n) * 0.5
    g = explain.gallery(probs, y, classes=classes, paths=paths, starts=starts, per_pair=n, limit=n)
    assert {e["index"] for e in g["shown"]} == wrong and g["misclassified"] == len(wrong)
    confidence = [e["confidence"] for e in g["shown"]]
    assert confidence == sorted(confidence, reverse=True)
    for e in g["shown"]:
        i = e["index"]
        assert (e["path"], e["start_seconds"]) == (paths[i], starts[i])
        assert (e["true"], e["predicted"]) == (classes[y[i]], classes[predicted[i]])
        assert e["confidence"] == pytest.approx(probs[i].max())
    # one per confused pair: each pair's most confident mistake, every pair present
    one = explain.gallery(
        probs, y, classes=classes, paths=paths, starts=starts, per_pair=1, limit=n
    )
    pairs = {(classes[y[i]], classes[predicted[i]]) for i in wrong}
    assert len(one["shown"]) == len(pairs) == one["pairs"]
    for e in one["shown"]:
        same = [
            i
            for i in wrong
            if (classes[y[i]], classes[predicted[i]]) == (e["true"], e["predicted"])
        ]
        assert e["confidence"] == pytest.approx(max(probs[i].max() for i in same))
    # the limit keeps the most confident
    two = explain.gallery(
        probs, y, classes=classes, paths=paths, starts=starts, per_pair=1, limit=2
    )
    assert two["shown"] == one["shown"][:2]


def test_the_gallery_takes_the_prediction_given_not_the_probabilities_argmax():
    probs = np.array([[0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    y = np.array([0, 0, 1])
    predicted = np.array([1, 0, 1])  # e.g. an SVM's decision where Platt scaling disagrees
    g = explain.gallery(
        probs,
        y,
        classes=["a", "b"],
        paths=["x"] * 3,
        starts=np.zeros(3),
        per_pair=5,
        limit=5,
        predicted=predicted,
    )
    assert [e["index"] for e in g["shown"]] == [0] and g["shown"][0]["confidence"] == 0.4


def test_mel_rows_map_to_hz_through_the_filterbank_scale():
    features = {"n_mels": 40, "f_min": 0.0, "f_max": None, "mel_scale": "htk"}
    edges = explain.row_edges_hz(40, extent=(0, 1, 0, 40), features=features, rate=8000)
    assert np.all(np.diff(edges) > 0) and 0 < edges[0] < 100 and 3800 < edges[-1] < 4000
    # linear bins: the extent's own frequencies
    linear = explain.row_edges_hz(4, extent=(0, 1, 0.0, 2000.0), features={}, rate=4000)
    assert linear.tolist() == [0.0, 500.0, 1000.0, 1500.0, 2000.0]
    assert explain.band_text(2800, 3437.5) == "2.80-3.44 kHz"
    assert explain.band_text(93.75, 1062.5) == "0.09-1.06 kHz"
    assert explain.band_text(120, 250) == "120-250 Hz"


@pytest.mark.parametrize(
    "values,match",
    [
        ({"enabled": "yes"}, r"explain\.enabled='yes' must be true or false"),
        ({"images_per_class": 0}, r"explain\.images_per_class=0 must be a whole number of at "),
        ({"gallery_per_pair": -1}, r"explain\.gallery_per_pair=-1 must be a whole number"),
        ({"gallery_max": 2.5}, r"explain\.gallery_max=2\.5 must be a whole number"),
        ({"per_class": 3}, r"explain\.per_class is not an explanation setting; known: enabled"),
    ],
)
def test_bad_settings_are_refused_in_one_sentence_naming_the_key(values, match):
    with pytest.raises(ConfigError, match=match), config_keys("explain."):
        explain.settings_from(values)


# The default job (its data generator, features, models and recipe), shrunk to seconds: ten
# files per class, one epoch, ResNet-8 and its plain twin, a one-point SVM grid.
SMALL_DEFAULT = [
    "data.generate.n_per_class=10",
    "train.epochs=1",
    "train.min_steps=0",
    "resnet.depth=8",
    "svm.C=[1.0]",
    "svm.gamma=[scale]",
    "svm.cv=2",
]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("explain")
    proc = cli(*SMALL_DEFAULT, f"data.root={tmp / 'synthetic'}", f"hydra.run.dir={tmp / 'run'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "run"


def expected_gallery(rows: list[dict], *, per_pair: int, limit: int) -> int:
    """How many windows a gallery shows for the predictions ``rows`` of a model."""
    pairs = Counter((r["true"], r["predicted"]) for r in rows if r["true"] != r["predicted"])
    return min(limit, sum(min(per_pair, n) for n in pairs.values()))


@pytest.mark.slow
def test_the_default_job_explains_its_networks_and_shows_every_models_mistakes(default_run):
    metrics = json.loads((default_run / "metrics.json").read_text())
    e, classes = metrics["explain"], metrics["dataset"]["classes"]
    assert set(e["models"]) == {"resnet", "plain_cnn", "svm"}
    assert e["seconds"] > 0 and e["cpu_seconds"] > 0
    nyquist = metrics["dataset"]["sample_rate"] / 2
    for net in ("resnet", "plain_cnn"):
        mp = e["models"][net]["map"]
        assert mp["layer"] == "layers.2" and set(mp["classes"]) == set(classes)
        for c in mp["classes"].values():
            assert 0 <= c["peak_hz"][0] < c["peak_hz"][1] <= nyquist
        per_class = metrics["dataset"]["per_class"].values()
        assert mp["occlusion"]["images"] == sum(min(4, n["test"]["segments"]) for n in per_class)
        assert mp["images"] == sum(min(32, n["test"]["segments"]) for n in per_class)
        for name in (f"gradcam_{net}.png", f"gradcam_profile_{net}.png"):
            assert (default_run / "figures" / name).is_file()
    assert "not a network" in e["models"]["svm"]["no_map"]
    settings = e["settings"]
    for name, r in e["models"].items():
        rows = read_csv(default_run / "predictions" / f"{name}.csv")
        wrong = {
            (row["path"], float(row["segment_start_seconds"]))
            for row in rows
            if row["true"] != row["predicted"]
        }
        shown = r["gallery"]["shown"]
        assert {(g["path"], g["start_seconds"]) for g in shown} <= wrong
        assert r["gallery"]["misclassified"] == len(wrong)
        n = expected_gallery(rows, per_pair=settings["gallery_per_pair"], limit=24)
        assert len(shown) == n
        assert (default_run / "figures" / f"misclassified_{name}.png").is_file() == (n > 0)
    md = (default_run / "report.md").read_text()
    assert "## Where the networks look, and what the models get wrong" in md
    assert "svm gets no map: it is not a network" in md
    for c in classes:
        band = e["models"]["resnet"]["map"]["classes"][c]["peak_text"]
        assert f"| {c} | {band} |" in md


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(dir=tmp_path, prefix="profile-")
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


# Only the explanation section shows (so a screenshot of the top of the page holds it), and
# once the page has loaded, every image's alt text and decoded width go into the DOM.
PROBE = """<style>main > *:not(#explain) { display: none; }</style>
<script>
window.addEventListener("load", () => {
  const seen = Array.from(document.images).map((i) => [i.alt, i.complete ? i.naturalWidth : 0]);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(seen);
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium or chromium-browser on PATH")
def test_headless_chromium_shows_the_maps_and_the_gallery(default_run, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    metrics = json.loads((default_run / "metrics.json").read_text())
    probe = tmp_path / "probe" / "report.html"
    probe.parent.mkdir()
    html = (default_run / "report.html").read_text()
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    shot = tmp_path / "explain.png"
    proc = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", probe.as_uri())
    assert shot.is_file(), proc.stderr
    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 1000  # maps in colour, not a blank page
    proc = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    decoded = dict(json.loads(found.group(1).replace("&quot;", '"')))
    assert len(decoded) == html.count("<img ") and all(w > 0 for w in decoded.values()), decoded
    expected = {"resnet: Grad-CAM maps per class", "plain_cnn: Grad-CAM maps per class"}
    expected |= {"resnet: attention per frequency", "plain_cnn: attention per frequency"}
    models = metrics["explain"]["models"]
    expected |= {
        f"{n}: misclassified test images" for n, r in models.items() if r["gallery"]["shown"]
    }
    assert any("misclassified" in a for a in expected)
    assert expected <= set(decoded), sorted(set(decoded))


@pytest.mark.slow
def test_rendering_again_keeps_the_maps_and_the_gallery(default_run, tmp_path):
    before = (default_run / "report.md").read_text()
    proc = cli("task=report", f"run_dir={default_run}", f"hydra.run.dir={tmp_path / 'render'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (default_run / "report.md").read_text() == before
    assert "Grad-CAM maps per class" in (default_run / "report.html").read_text()


@pytest.mark.parametrize(
    "override,message",
    [
        ("explain.images_per_class=0", "explain.images_per_class=0 must be a whole number"),
        ("explain.enabled=maybe", "explain.enabled='maybe' must be true or false"),
    ],
)
def test_a_bad_explain_setting_ends_the_run_with_one_sentence(tmp_path, override, message):
    proc = cli(override, f"hydra.run.dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert [line for line in lines if message in line] == [lines[-1]], lines[-3:]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_explain_enabled_false_computes_nothing_and_the_report_says_so():
    from pipeline import report

    metrics = {
        "models": {},
        "dataset": {"classes": ["a"], "n_test": 3},
        "explain": explain.section({}, settings=explain.ExplainSettings(enabled=False)),
    }
    page = '{% from "_explain.j2" import report_md with context %}{{ report_md() }}'
    text = report.templates(html=False).from_string(page)
    rendered = text.render(m=metrics, figures=[], code=report.md_code)
    assert "Not computed (`explain.enabled=false`)." in rendered
