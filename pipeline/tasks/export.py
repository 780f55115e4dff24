"""Export a network bundle to ONNX: by default the whole classifier, waveform in.

``export.input=waveform`` (default): the graph takes windows of raw samples (batch,
channels, samples), float32 at the bundle's rate and window length, and returns
``probabilities`` (softmax of logits over the bundle's temperature) and ``logits``; the
front end (STFT, mel, dB, smoothing, resize, normalisation; or a raw-input bundle's window
standardisation) is inside it (:mod:`pipeline.onnx_frontend`). ``export.input=image``: the
network alone, on the normalised images the front end gives (its settings in the sidecar).

The sidecar ``<output>.json`` holds the classes, the rate, the window length and hop for
cutting a file into windows, the input and output names and what they hold. The export
checks itself against the PyTorch predict path (:mod:`pipeline.onnx_check`) and removes what
it wrote when they disagree; ``export.quantize=dynamic`` also writes an int8 graph.
"""

from __future__ import annotations

import importlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from pipeline import atomic
from pipeline.bundle import Bundle, load_bundle
from pipeline.calibration import bundle_temperature
from pipeline.errors import BundleError, ConfigError
from pipeline.frontend import Frontend
from pipeline.models.base import wrap
from pipeline.onnx_check import CheckWindows
from pipeline.onnx_frontend import check_exportable, waveform_classifier
from pipeline.values import is_number, is_whole

log = logging.getLogger(__name__)

# What torch.onnx.export(dynamo=True) imports; onnxruntime, for the check only, is optional.
EXPORT_MODULES = ("onnx", "onnxscript")
NAMES = {"svm": "an SVM", "minirocket": "a MiniRocket"}
INPUTS = ("waveform", "image")
QUIET = ("onnx_ir", "onnxscript", "torch.onnx")
QUANTIZE = (None, "dynamic")
# What the image graph's input holds, for the sidecar.
MEANINGS = {
    "image": "STFT images after normalisation, see features and normalizer",
    "raw": "raw windows (channels, samples) standardised as window_norm says, see data",
}


@dataclass(frozen=True)
class Settings:
    """The ``export`` settings, checked (see conf/task/export.yaml)."""

    output: Path
    input: str
    check: bool
    check_input: Path | None
    check_windows: int | None
    tolerance: float
    quantize: str | None

    @property
    def int8(self) -> Path:
        """The quantised graph: ``<output stem>.int8.onnx``."""
        return self.output.with_name(self.output.stem + ".int8.onnx")


def require_onnx() -> None:
    """Import what the exporter needs, before any work is done.

    Raises:
        ConfigError: one of :data:`EXPORT_MODULES` cannot be imported (the ``onnx``
            extra is not installed); the message says how to install it.
    """
    missing = []
    for name in EXPORT_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"task=export needs {' and '.join(missing)}, which cannot be imported here; "
            'install the onnx extra: pip install -e ".[onnx]"'
        )


def run(cfg: DictConfig, *, run_dir: Path) -> dict:
    """Write ``export.output`` (ONNX) and its JSON sidecar; check them with onnxruntime."""
    e = cfg.export
    require_onnx()
    s = check_settings(e, run_dir)
    bundle = load_bundle(e.model, key="export.model")
    model = wrap(bundle.model)
    if not model.exports:
        raise BundleError(
            f"export.model={e.model!r} is {NAMES.get(model.kind, model.kind)} bundle; ONNX "
            "export covers the networks (resnet, plain_cnn, resnet1d): point export.model at "
            "one of those"
        )
    if s.input == "waveform":
        check_exportable(bundle)
    network = model.fitted.eval()
    shape = input_shape(bundle, model, s.input)
    module = waveform_classifier(bundle, network) if s.input == "waveform" else network
    with atomic.atomic_path(s.output) as tmp:
        onnx_program(module, shape, graph=s.input).save(str(tmp))
    atomic.write_json(s.output.with_suffix(".json"), sidecar(bundle, model, s.input, shape))
    result = {"output": str(s.output), "input": s.input, "checked": False}
    result["bytes"] = s.output.stat().st_size
    windows = None
    if s.check:
        windows, checked = check_written(s, bundle, model)
        result.update(checked)
    if s.quantize:
        result["int8"] = quantize_graph(s, bundle, windows, result)
    print_summary(result, s)
    return {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}


def check_settings(e: DictConfig, run_dir: Path) -> Settings:
    """The ``export`` settings checked.

    Raises:
        ConfigError: naming the first bad setting.
    """
    output = Path(e.output) if e.output else run_dir / "model.onnx"
    if output.suffix != ".onnx":
        raise ConfigError(f"export.output={str(output)!r} must end in .onnx")
    graph = e.get("input", "waveform")
    if graph not in INPUTS:
        raise ConfigError(
            f"export.input={graph!r} must be waveform (raw samples in, the front end inside "
            "the graph) or image (the network alone, on the front end's normalised images)"
        )
    if not isinstance(e.check, bool):
        raise ConfigError(f"export.check={e.check!r} must be true or false")
    if not (is_number(e.tolerance) and e.tolerance > 0):
        raise ConfigError(
            f"export.tolerance={e.tolerance!r} must be a positive number (the largest absolute "
            "difference between onnxruntime's and PyTorch's probabilities, or logits for "
            "export.input=image), e.g. 1e-4"
        )
    quantize = e.get("quantize")
    if quantize not in QUANTIZE:
        raise ConfigError(
            f"export.quantize={quantize!r} must be null (float32 only) or dynamic (also an "
            "int8 graph from onnxruntime's quantize_dynamic)"
        )
    limit = e.get("check_windows", 2048)
    if limit is not None and not is_whole(limit, minimum=1):
        raise ConfigError(
            f"export.check_windows={limit!r} must be a positive integer (windows of "
            "export.check_input the check classifies), or null for all of them"
        )
    check_input = e.get("check_input")
    if check_input and not Path(check_input).exists():
        raise ConfigError(
            f"export.check_input={str(check_input)!r} does not exist; give a folder of signal "
            "files (class subfolders named like the bundle's classes give accuracies too), or "
            "null for generated test signals"
        )
    return Settings(
        output=output,
        input=graph,
        check=e.check,
        check_input=Path(check_input) if check_input else None,
        check_windows=limit,
        tolerance=float(e.tolerance),
        quantize=quantize,
    )


def input_shape(bundle: Bundle, model, graph: str) -> tuple[int, ...]:
    """One input's shape: (channels, samples) for a waveform graph, else the network's."""
    front = Frontend.from_bundle(bundle)
    if graph == "waveform":
        return (model.in_channels, front.segmenting.length)
    return front.input_shape(model.input, model.in_channels)


def onnx_program(module: torch.nn.Module, shape: tuple[int, ...], *, graph: str = "image"):
    """The module as an ONNX program, its batch size free: (batch, *shape) -> outputs.

    ``graph`` ``waveform``: input ``waveform``, outputs ``probabilities`` and ``logits``;
    ``image``: input ``image``, output ``logits``.
    """
    example = torch.randn(2, *shape)  # (batch, channels, samples) or the network's input
    if graph == "waveform":
        inputs, outputs = ["waveform"], ["probabilities", "logits"]
    else:
        inputs, outputs = ["image"], ["logits"]
    for name in QUIET:  # the optimiser's INFO lines, one per rewrite, under Hydra's logging
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes about optional torchvision ops
        return torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            verbose=False,
        )


def sidecar(bundle: Bundle, model, graph: str, shape: tuple[int, ...]) -> dict:
    """What a runtime needs beside the graph: classes, rate, windows, names and meanings."""
    data = bundle.data
    temperature = bundle_temperature(bundle.meta, file="bundle.json")
    segmenting = {
        "sample_rate": data["sample_rate"],
        "channels": data.get("channels", "mix"),
        "window_samples": data["segment_samples"],
        "hop_samples": data["hop_samples"],
        "pad": data["pad"],
        "aggregate": "mean",
    }
    if graph == "waveform":
        inp = {
            "name": "waveform",
            "shape": ["batch", *shape],
            "dtype": "float32",
            "meaning": (
                "windows of raw samples at sample_rate, window_samples long, cut every "
                "hop_samples (zero-padded as pad says); channels read as channels says "
                "(mix: the mean of the file's channels); the front end is inside the graph"
            ),
        }
        outputs = [
            {
                "name": "probabilities",
                "shape": ["batch", len(bundle.classes)],
                "meaning": f"softmax(logits / temperature), temperature {temperature:g}",
            },
            {"name": "logits", "shape": ["batch", len(bundle.classes)], "meaning": "the network's"},
        ]
    else:
        inp = {"name": "image", "shape": ["batch", *shape], "meaning": MEANINGS[model.input]}
        outputs = [{"name": "logits", "shape": ["batch", len(bundle.classes)]}]
    return {
        "graph": graph,
        "input": inp,
        "outputs": outputs,
        "output": {"name": outputs[0]["name"], "classes": bundle.classes},
        "classes": bundle.classes,
        "temperature": temperature,
        **segmenting,
        **{k: bundle.meta[k] for k in ("data", "features", "normalizer", "versions")},
        **({"window_norm": bundle.meta["window_norm"]} if model.input == "raw" else {}),
    }


def check_written(s: Settings, bundle: Bundle, model) -> tuple[CheckWindows | None, dict]:
    """Check the written graph against the predict path; remove it and its sidecar when they
    disagree. Returns the windows checked on and the figures.

    Raises:
        BundleError: probabilities (logits for an image graph) differ by more than
            ``export.tolerance``, or a window's or file's label differs.
    """
    try:
        import onnxruntime  # noqa: F401 (the check's runtime)
    except ImportError:
        log.warning("onnxruntime is not installed: the export is not checked")
        return None, {"checked": False}
    from pipeline.onnx_check import folder_windows, generated_windows, parity
    from pipeline.tasks.predict import Classifier

    front = Frontend.from_bundle(bundle)
    if s.check_input is not None:
        classify = Classifier(bundle, device=torch.device("cpu"), amp=False)
        windows = folder_windows(s.check_input, classify, limit=s.check_windows)
    else:
        rate = front.sample_rate
        windows = generated_windows(model.in_channels, front.segmenting.length, rate)
    result = parity(s.output, bundle, windows, graph=s.input)
    result["checked"], result["source"] = True, windows.source
    bad = (
        result["max_abs_diff"] > s.tolerance
        or result["window_labels_differ"]
        or result["file_labels_differ"]
        or result.get("refused_differ", 0)
    )
    if bad:
        for written in (s.output, s.output.with_suffix(".json")):  # no unfaithful export stays
            written.unlink(missing_ok=True)
        raise BundleError(
            f"{s.output}: onnxruntime's {result['compared']} differ from the predict path's by "
            f"{result['max_abs_diff']:.3g} (export.tolerance={s.tolerance:g}) and "
            f"{result['window_labels_differ']} window and {result['file_labels_differ']} file "
            f"label(s) differ ({result.get('refused_differ', 0)} window(s) refused by one "
            f"alone), on {windows.source}; the export is not faithful and was removed"
        )
    return windows, result


def quantize_graph(s: Settings, bundle: Bundle, windows, checked: dict) -> dict:
    """Write ``<stem>.int8.onnx`` (int8 weights of the network's convolutions and matrix
    products, onnxruntime's ``quantize_dynamic``; the front end stays float32) and its
    sidecar; compare it with the float32 graph on the checked windows.

    Raises:
        ConfigError: onnxruntime (its quantisation tools) is not installed.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ConfigError(
            "export.quantize=dynamic needs onnxruntime, which cannot be imported here; install "
            'the onnx extra: pip install -e ".[onnx]"'
        ) from None
    import onnx

    graph = onnx.load(str(s.output))
    front = {i.name for i in graph.graph.initializer if i.name.startswith("front.")}
    exclude = [n.name for n in graph.graph.node if front & set(n.input)]
    with atomic.atomic_path(s.int8) as tmp:
        quantize_dynamic(
            s.output,
            tmp,
            op_types_to_quantize=["Conv", "MatMul"],
            nodes_to_exclude=exclude,
            weight_type=QuantType.QInt8,
        )
    meta = json.loads(s.output.with_suffix(".json").read_text())
    meta["quantized"] = "dynamic: int8 weights of the network (onnxruntime quantize_dynamic)"
    atomic.write_json(s.int8.with_suffix(".json"), meta)
    out = {"output": str(s.int8), "bytes": s.int8.stat().st_size}
    if windows is not None and "probabilities" in checked:
        out.update(compare_int8(s, bundle, windows, checked))
    return out


def compare_int8(s: Settings, bundle: Bundle, windows, checked: dict) -> dict:
    """The int8 graph's labels and file accuracy against the float32 graph's."""
    from pipeline.onnx_check import agreement, classify_probabilities, run_graph

    if s.input == "waveform":
        probs = run_graph(s.int8, windows.x, ["probabilities"])["probabilities"]
    else:
        from pipeline.onnx_check import reference
        from pipeline.tasks.predict import Classifier

        classify = Classifier(bundle, device=torch.device("cpu"), amp=False)
        images = reference(classify, windows.x)["inputs"]
        probs = classify_probabilities(run_graph(s.int8, images, ["logits"])["logits"], bundle)
    return agreement(probs, checked["probabilities"], checked["reference"], windows, bundle.classes)


def print_summary(result: dict, s: Settings) -> None:
    """Where the graphs are, their sizes, the check's and the quantisation's figures."""
    print(f"onnx: {s.output} ({s.input} in, {result['bytes'] / 1024:.0f} KiB)")
    if result["checked"]:
        print(
            f"checked with onnxruntime against the predict path (float32) on "
            f"{result['source']}: max |difference| of {result['compared']} "
            f"{result['max_abs_diff']:.2e} (export.tolerance {s.tolerance:g}); "
            f"{result['window_labels_differ']} of {result['windows']} window labels and "
            f"{result['file_labels_differ']} of {result['files']} file labels differ"
        )
    elif s.check:
        print("not checked: onnxruntime is not installed (pip install onnxruntime)")
    q = result.get("int8")
    if q is None:
        return
    kib = q["bytes"] / 1024, result["bytes"] / 1024
    line = f"int8: {q['output']} ({kib[0]:.0f} KiB against float32's {kib[1]:.0f} KiB)"
    if "windows" in q:
        line += (
            f"; labels agree with float32's on {q['window_labels_agree']} of {q['windows']} "
            f"windows and {q['file_labels_agree']} of {q['files']} files"
        )
    if q.get("accuracy") is not None:
        line += (
            f"; file accuracy {q['accuracy']:.4f} against float32's {q['accuracy_float32']:.4f} "
            f"on {q['labelled']} labelled file(s)"
        )
    print(line)
