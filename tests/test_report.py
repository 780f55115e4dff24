"""The reports: figures, report.md and report.html of a run, McNemar's tests, task=report,
the sweep summary, and the HTML page as headless Chromium renders it."""

from __future__ import annotations

import base64
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline import metrics as metrics_mod
from pipeline import report
from pipeline.tasks import report as report_task
from tests.conftest import write_tone_dataset


def metrics_for(n_classes: int, **features) -> dict:
    return {
        "models": {},
        "dataset": {
            "classes": [f"class_{i}" for i in range(n_classes)],
            "sample_rate": 8000,
            "segment_samples": 8000,
        },
        "features": {
            "scale": "db",
            "n_fft": 256,
            "n_mels": None,
            "f_min": 0.0,
            "f_max": None,
            **features,
        },
    }


@pytest.mark.parametrize(
    "n_classes,features",
    [(1, {}), (7, {"n_mels": 40}), (40, {"f_min": 100.0, "f_max": 3000.0})],
)
def test_one_example_per_class_is_saved_as_png(tmp_path, n_classes, features):
    images = np.random.default_rng(0).normal(size=(n_classes, 1, 32, 20)).astype(np.float32)
    written = report.write_figures(tmp_path, metrics_for(n_classes, **features), examples=images)
    assert written == {"examples": "figures/examples.png"}
    png = (tmp_path / "figures" / "examples.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert not list((tmp_path / "figures").glob(".*.tmp"))  # written through a temporary file


def test_example_axes_are_in_seconds_and_hz_or_mel_bands():
    images = np.zeros((2, 1, 8, 8), np.float32)
    fig = report.plot_examples(images, metrics_for(2, f_min=500.0, f_max=2000.0))
    ax = fig.axes[0]
    assert ax.get_ylabel() == "frequency (Hz)" and ax.get_xlabel() == "time (s)"
    assert ax.images[0].get_extent() == [0.0, 1.0, 500.0, 2000.0]
    mel = report.plot_examples(images, metrics_for(2, n_mels=40)).axes[0]
    assert mel.get_ylabel().startswith("mel band (0-4000 Hz)")
    assert mel.images[0].get_extent() == [0.0, 1.0, 0.0, 40.0]


# --- a tiny run of the CLI, shared by the tests below --------------------------------------

REPO = Path(__file__).resolve().parents[1]
MODELS = ["resnet", "plain_cnn", "svm"]
# Half-second tones cut into 0.25 s windows every 0.125 s: three windows per file, so the
# headline table has its file-level column; small images and grids keep a run to seconds.
TINY = [
    "data=folder",
    "data.sample_rate=1000",
    "data.segment.length_seconds=0.25",
    "data.segment.hop_seconds=0.125",
    f"models=[{','.join(MODELS)}]",
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
    "progress=false",
]


def cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    data = write_tone_dataset(tmp / "tones")
    proc = cli(*TINY, f"data.root={data}", f"hydra.run.dir={tmp / 'run'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "run"


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    data = write_tone_dataset(tmp / "tones")
    proc = cli(
        "-m",
        "seed=0,1",
        *TINY,
        "models=[resnet,svm]",
        "train.epochs=1",
        "train.min_steps=0",
        f"data.root={data}",
        f"hydra.sweep.dir={tmp / 'sweep'}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"sweep summary: {tmp / 'sweep' / 'summary.md'}" in proc.stdout
    return tmp / "sweep"


def markdown_table(text: str, heading: str) -> list[list[str]]:
    """The cells of the first table after ``heading`` (header row first, no rule row)."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not all(set(c) <= set("-:") for c in cells):
            rows.append(cells)
    return rows


class Page(HTMLParser):
    """Tables by id (rows of cell texts, <strong>/bold cells marked), images, links and ids."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.best: dict[str, set[tuple[int, int]]] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self._table = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])
        elif tag == "table":
            self._table = a.get("id")
            if self._table:
                self.tables[self._table], self.best[self._table] = [], set()
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
            if "best" in (a.get("class") or "").split():
                rows = self.tables[self._table]
                self.best[self._table].add((len(rows) - 1, len(rows[-1])))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None


# title in the report, key in metrics.json
COLUMNS = {
    "accuracy": "accuracy",
    "balanced acc.": "balanced_accuracy",
    "macro-F1": "macro_f1",
    "file acc.": "file_accuracy",
    "parameters": "n_params",
    "train s": "train_seconds",
    "inference img/s": "inference_images_per_second",
}


def assert_cell_shows(cell: str, value: float) -> None:
    """``cell`` is ``value`` rounded to the decimals the cell shows."""
    text = cell.strip("*").replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    assert float(text) == pytest.approx(value, abs=0.5 * 10**-decimals + 1e-12), (cell, value)


def check_headline(rows: list[list[str]], metrics: dict, best: set[tuple[int, int]]) -> None:
    header, body = rows[0], rows[1:]
    assert header[0] == "model" and [r[0] for r in body] == list(metrics["models"])
    assert {
        "accuracy",
        "balanced acc.",
        "macro-F1",
        "file acc.",
        "parameters",
        "train s",
        "inference img/s",
    } == set(header[1:])
    for j, title in enumerate(header[1:], start=1):
        key = COLUMNS[title]
        values = [metrics["models"][r[0]][key] for r in body]
        for i, (row, value) in enumerate(zip(body, values, strict=True), start=1):
            assert_cell_shows(row[j], value)
            if key != "n_params":  # the best value of the column, and only it, is marked
                top = min(values) if key == "train_seconds" else max(values)
                assert ((i, j) in best) == (value == top), (title, row[0])


@pytest.mark.slow
def test_a_run_writes_both_reports_beside_its_files(tiny_run):
    for name in [
        "report.md",
        "report.html",
        "metrics.json",
        "figures/learning_curves.png",
        "figures/examples.png",
        *(f"figures/confusion_{m}.png" for m in MODELS),
        *(f"predictions/{m}.csv" for m in MODELS),
    ]:
        assert (tiny_run / name).is_file(), name
    assert not list(tiny_run.glob(".*.tmp"))  # both written through temporary files
    md = (tiny_run / "report.md").read_text()
    html = (tiny_run / "report.html").read_text()
    sections = [
        "Results on the test split",
        "Significance",
        "Per-class precision",
        "Learning curves",
        "Dataset",
        "Features",
        "Environment and reproduction",
    ]
    for text, mark in ((md, "## "), (html, "<h2>")):
        where = [text.index(mark + s) for s in sections]
        assert where == sorted(where)  # the order
    config = json.loads((tiny_run / "metrics.json").read_text())["run"]["config"]
    assert config["train"]["epochs"] == 2 and "hydra.run.dir=" in md  # config and command


@pytest.mark.slow
def test_every_headline_number_equals_metrics_json(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    md = markdown_table((tiny_run / "report.md").read_text(), "## Results on the test split")
    bold = {(i, j) for i, row in enumerate(md) for j, c in enumerate(row) if c.startswith("**")}
    check_headline(md, metrics, bold)
    page = Page((tiny_run / "report.html").read_text())
    check_headline(page.tables["headline"], metrics, page.best["headline"])
    assert [r[1:] for r in page.tables["headline"]] == [
        [c.strip("*") for c in r[1:]] for r in md
    ]  # the same text in both


@pytest.mark.slow
def test_mcnemar_p_values_match_a_direct_computation(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    # The tiny run cuts files into windows, so the test is on files: each file's windows
    # combined by their mean softmax score, from the prediction files.
    correct = {}
    for name in MODELS:
        files: dict[str, list] = {}
        with open(tiny_run / "predictions" / f"{name}.csv") as f:
            for r in csv.DictReader(f):
                scores = np.array([float(v) for k, v in r.items() if k.startswith("score_")])
                classes = [k[len("score_") :] for k in r if k.startswith("score_")]
                probs = np.exp(scores - scores.max())
                files.setdefault(r["path"], [r["true"], []])[1].append(probs / probs.sum())
        correct[name] = np.array(
            [true == classes[int(np.mean(p, axis=0).argmax())] for true, p in files.values()]
        )
    windows = (tiny_run / "predictions" / "svm.csv").read_text().count("\n") - 1
    assert len(correct[MODELS[0]]) < windows
    pairs = [(a, b) for i, a in enumerate(MODELS) for b in MODELS[i + 1 :]]
    tests = metrics["significance"]
    assert [(s["a"], s["b"]) for s in tests] == pairs
    assert {s["unit"] for s in tests} == {"files"}
    md = markdown_table((tiny_run / "report.md").read_text(), "## Significance")
    html = Page((tiny_run / "report.html").read_text()).tables["significance-table"]
    for s, md_row, html_row in zip(tests, md[1:], html[1:], strict=True):
        a, b = correct[s["a"]], correct[s["b"]]
        n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
        p = binomtest(n01, n01 + n10, 0.5).pvalue if n01 + n10 else 1.0
        assert (s["a_only"], s["b_only"], s["n"]) == (n01, n10, len(a))
        assert s["p_value"] == pytest.approx(p, rel=1e-12)
        assert md_row == html_row
        assert md_row[:4] == [s["a"], s["b"], str(n01), str(n10)]
        assert float(md_row[4]) == pytest.approx(p, rel=5e-3)


def test_mcnemar_counts_only_discordant_items_and_holm_adjusts():
    y = np.zeros(20, dtype=int)
    a = y.copy()  # right everywhere
    b = y.copy()
    b[:9] = 1  # wrong on 9 items that a gets right
    c = y.copy()
    c[:9] = 1
    c[9] = 1  # b's nine errors and one more
    result = metrics_mod.pairwise_mcnemar(y, {"a": a, "b": b, "c": c})
    ab, ac, bc = result
    assert (ab["a_only"], ab["b_only"], ab["p_value"]) == (9, 0, pytest.approx(2 * 0.5**9))
    assert (bc["a_only"], bc["b_only"], bc["p_value"]) == (1, 0, 1.0)
    assert ac["p_value"] == pytest.approx(binomtest(10, 10).pvalue)
    # Holm: the smallest p times 3, the next times 2 (never below the one before), then x1
    assert ac["p_holm"] == pytest.approx(3 * ac["p_value"])
    assert ab["p_holm"] == pytest.approx(max(3 * ac["p_value"], 2 * ab["p_value"]))
    assert bc["p_holm"] == 1.0
    assert metrics_mod.mcnemar(a == y, a == y)["p_value"] == 1.0  # no discordant item


@pytest.mark.slow
def test_task_report_renders_the_same_report_again(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "report.md").read_text()
    for name in ("report.md", "report.html", "figures/learning_curves.png"):
        (run / name).unlink()
    proc = cli("task=report", f"run_dir={run}", f"hydra.run.dir={tmp_path / 'render'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (run / "report.md").read_text() == before
    assert (run / "figures" / "learning_curves.png").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    page = Page((run / "report.html").read_text())
    check_headline(page.tables["headline"], metrics, page.best["headline"])


@pytest.mark.parametrize("missing", ["significance", "config"])
def test_a_run_of_an_older_version_is_refused_with_one_sentence(tmp_path, missing):
    from pipeline.errors import ConfigError

    metrics = {"models": {"resnet": {}}, "significance": [], "run": {"config": {}}}
    metrics.pop(missing, None)
    metrics["run"].pop(missing, None)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ConfigError) as err:
        report_task.rerender_run(tmp_path)
    assert str(err.value) == (
        f"run_dir={str(tmp_path)!r}: {tmp_path / 'metrics.json'} is from an older version of "
        "this tool; run it again with this version"
    )


@pytest.mark.parametrize("make", ["missing", "empty", "broken"])
def test_task_report_on_a_bad_folder_ends_with_one_clear_line(tmp_path, make):
    target = tmp_path / "folder"
    if make != "missing":
        target.mkdir()
    if make == "broken":
        (target / "metrics.json").write_text("{not json")
    proc = cli("task=report", f"run_dir={target}", f"hydra.run.dir={tmp_path / 'render'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert f"run_dir='{target}'" in out and "give the folder of a" in out
    assert "Traceback" not in out


def check_links(page_path: Path) -> Page:
    """Every image is an embedded PNG; every link is an anchor of the page or a file beside it."""
    page = Page(page_path.read_text())
    assert page.images
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:60]
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    for href in page.links:
        if href.startswith("#"):
            assert href[1:] in page.ids, href
        else:
            assert "://" not in href and (page_path.parent / href).is_file(), href
    return page


@pytest.mark.slow
def test_html_pages_have_no_broken_links(tiny_run, tiny_sweep):
    # learning curves, examples, reliability diagrams and a confusion matrix per model; per
    # network a Grad-CAM map and its frequency profile, per model with mistakes a gallery
    explained = json.loads((tiny_run / "metrics.json").read_text())["explain"]["models"]
    maps = sum(2 for e in explained.values() if "map" in e)
    galleries = sum(1 for e in explained.values() if e["gallery"]["shown"])
    assert maps == 4  # the ResNet and its plain twin
    n = 3 + len(MODELS) + maps + galleries
    assert len(check_links(tiny_run / "report.html").images) == n
    assert len(check_links(tiny_sweep / "summary.html").images) == 1


@pytest.mark.slow
def test_sweep_summary_gives_mean_and_std_of_the_runs(tiny_sweep):
    summary = json.loads((tiny_sweep / "summary.json").read_text())
    runs = [json.loads((tiny_sweep / d / "metrics.json").read_text()) for d in ("0", "1")]
    assert summary["n_runs"] == 2 and [r["seed"] for r in summary["runs"]] == [0, 1]
    (setting,) = summary["settings"]  # only the seed varies: one setting
    assert setting["n_runs"] == 2 and summary["split_follows_seed"]
    md = markdown_table((tiny_sweep / "summary.md").read_text(), "## All runs")
    header = md[0]
    for row in md[1:]:
        name = row[0]
        for title, cell in zip(header[1:], row[1:], strict=True):
            key = COLUMNS[title]
            values = [r["models"][name][key] for r in runs]
            stats = setting["models"][name][key]
            assert stats["mean"] == pytest.approx(np.mean(values))
            assert stats["std"] == pytest.approx(np.std(values, ddof=1))
            mean, std = cell.strip("*").split(" ± ")
            assert_cell_shows(mean, np.mean(values))
            assert_cell_shows(std, np.std(values, ddof=1))
    html = Page((tiny_sweep / "summary.html").read_text())
    assert "0/report.html" in html.links and "1/report.html" in html.links
    # task=report renders the same summary from the sweep folder
    before = (tiny_sweep / "summary.md").read_text()
    (tiny_sweep / "summary.md").unlink()
    proc = cli("task=report", f"run_dir={tiny_sweep}", f"hydra.run.dir={tiny_sweep}.render")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tiny_sweep / "summary.md").read_text() == before


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Counts the images the browser decoded, once the page has loaded, into the title.
COUNT_IMAGES = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const decoded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.title = "decoded " + decoded + " of " + images.length;
});
</script>"""


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


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium or chromium-browser on PATH (Debian: apt-get install -y chromium)",
)
def test_headless_chromium_renders_the_report_with_its_images(tiny_run, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    page = tiny_run / "report.html"
    shot = tmp_path / "report.png"
    proc = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri())
    assert shot.is_file(), proc.stderr
    with Image.open(shot) as im:
        assert im.size == (1280, 4000)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 200  # text, tables and figures, not a blank page
    # the same page with a counting script, read back from the DOM chromium dumps
    probe = tmp_path / "probe" / "report.html"
    probe.parent.mkdir()
    probe.write_text(page.read_text().replace("</body>", COUNT_IMAGES + "</body>"))
    proc = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    n = len(Page(page.read_text()).images)
    assert f"<title>decoded {n} of {n}</title>" in proc.stdout, proc.stderr[-2000:]


def test_file_level_predictions_average_each_files_window_scores():
    # Three files: 0 has windows voting 2:1 for class 1 with a confident dissenter,
    # 1 has one window, 2 has two windows; the records are not sorted.
    scores = np.log(
        np.array([[0.6, 0.4], [0.05, 0.95], [0.45, 0.55], [0.9, 0.1], [0.2, 0.8], [0.45, 0.55]])
    )
    record = np.array([7, 7, 7, 3, 9, 9])
    y_true = np.array([0, 0, 0, 0, 1, 1])
    y_file, pred = metrics_mod.file_level_predictions(scores, y_true, record)
    # Files in order 3, 7, 9; file 7's mean probability of class 1 is (0.4+0.95+0.55)/3.
    assert y_file.tolist() == [0, 0, 1] and pred.tolist() == [0, 1, 1]
    assert metrics_mod.file_level_accuracy(scores, y_true, record) == pytest.approx(2 / 3)
