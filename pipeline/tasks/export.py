"""Export a network bundle to ONNX: the network on normalised STFT images.

The STFT front end is not part of the graph (the ONNX exporters do not
translate complex-valued STFTs); its settings, the normalisation statistics
and the classes are written beside the model as ``<output>.json``, so another
runtime can rebuild the images exactly.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from pipeline import atomic
from pipeline.bundle import load_bundle
from pipeline.errors import BundleError, ConfigError
from pipeline.frontend import Frontend
from pipeline.models.base import wrap
from pipeline.values import is_number

log = logging.getLogger(__name__)

# What torch.onnx.export(dynamo=True) imports; onnxruntime, for the check only, is optional.
EXPORT_MODULES = ("onnx", "onnxscript")
NAMES = {"svm": "an SVM", "minirocket": "a MiniRocket"}
# What the ONNX input holds, for the sidecar.
MEANINGS = {
    "image": "STFT images after normalisation, see features and normalizer",
    "raw": "raw windows (channels, samples) standardised as window_norm says, see data",
}


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
    bundle = load_bundle(e.model, key="export.model")
    model = wrap(bundle.model)
    if not model.exports:
        raise BundleError(
            f"export.model={e.model!r} is {NAMES.get(model.kind, model.kind)} bundle; ONNX "
            "export covers the networks (resnet, plain_cnn, resnet1d): point export.model at "
            "one of those"
        )
    output = check_settings(e, run_dir)
    network = model.fitted.eval()
    image = Frontend.from_bundle(bundle).input_shape(model.input, model.in_channels)
    with atomic.atomic_path(output) as tmp:
        onnx_program(network, image).save(str(tmp))
    sidecar = {
        "input": {
            "name": "image",  # the graph's input name, whatever it holds (see "meaning")
            "shape": ["batch", *image],
            "meaning": MEANINGS[model.input],
        },
        "output": {"name": "logits", "classes": bundle.classes},
        **{k: bundle.meta[k] for k in ("classes", "data", "features", "normalizer", "versions")},
        **({"window_norm": bundle.meta["window_norm"]} if model.input == "raw" else {}),
    }
    atomic.write_json(output.with_suffix(".json"), sidecar)
    result = {"output": str(output), "checked": False}
    if e.check:
        result.update(check_onnx(output, network, example_shape=(5, *image)))
        if result["max_abs_diff"] > e.tolerance:
            for written in (output, output.with_suffix(".json")):  # no unfaithful export stays
                written.unlink(missing_ok=True)
            raise BundleError(
                f"{output}: onnxruntime's logits differ from PyTorch's by "
                f"{result['max_abs_diff']:.3g} > export.tolerance={e.tolerance}; the export is "
                "not faithful"
            )
    print(f"onnx: {output}")
    if result["checked"]:
        print(f"checked with onnxruntime: max |difference| {result['max_abs_diff']:.2e}")
    elif e.check:
        print("not checked: onnxruntime is not installed (pip install onnxruntime)")
    return result


def check_settings(e: DictConfig, run_dir: Path) -> Path:
    """The ``export`` settings checked; returns the ONNX file to write.

    Raises:
        ConfigError: naming the first bad setting.
    """
    output = Path(e.output) if e.output else run_dir / "model.onnx"
    if output.suffix != ".onnx":
        raise ConfigError(f"export.output={str(output)!r} must end in .onnx")
    if not isinstance(e.check, bool):
        raise ConfigError(f"export.check={e.check!r} must be true or false")
    if not (is_number(e.tolerance) and e.tolerance > 0):
        raise ConfigError(
            f"export.tolerance={e.tolerance!r} must be a positive number (the largest absolute "
            "difference between onnxruntime's and PyTorch's logits), e.g. 1e-4"
        )
    return output


def onnx_program(network: torch.nn.Module, image: tuple[int, ...]):
    """The network as an ONNX program, its batch size free: (batch, *image) -> logits."""
    example = torch.randn(2, *image)  # (batch, channels, freq, time) or (batch, channels, time)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes about optional torchvision ops
        return torch.onnx.export(
            network,
            (example,),
            dynamo=True,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )


def check_onnx(path: Path, model: torch.nn.Module, *, example_shape: tuple[int, ...]) -> dict:
    """Largest absolute difference between onnxruntime's and PyTorch's logits on random images."""
    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: the export is not checked")
        return {"checked": False}
    x = torch.randn(*example_shape, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    return {"checked": True, "max_abs_diff": float(np.abs(got - want).max())}
