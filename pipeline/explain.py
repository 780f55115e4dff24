"""Where the networks look in the spectrogram, and what every model gets wrong.

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", https://arxiv.org/abs/1610.02391) at a network's last stage,
upsampled to the image and averaged per class over the test images of that class (the true
class's score); its frequency profile (the map averaged over time) and the band around the
profile's peak; an occlusion check that masking each image's top-attention band lowers the
class probability more than masking random bands of the same height; and the most
confident mistakes of each model on the test split.

Images are (n, channels, height, width) with row 0 the lowest frequency (as the report
draws them, ``origin="lower"``); maps are (n, height, width).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pipeline.errors import ConfigError
from pipeline.fit import predict_logits
from pipeline.values import is_whole

log = logging.getLogger(__name__)

# The occlusion check masks bands of this fraction of the image height (at least one row),
# against this many random bands per image; masked rows take 0, the training images' mean
# after normalisation.
BAND_FRACTION = 1 / 8
RANDOM_BANDS = 8


@dataclass(frozen=True)
class ExplainSettings:
    """What the explanation step computes, and how much of the test split it spends.

    Attributes:
        enabled: compute the maps, the occlusion check and the gallery at all.
        images_per_class: test images per class each class map averages (the first ones).
        occlusion_per_class: test images per class the occlusion check masks; 0: no check.
        gallery_per_pair: misclassified windows per (true, predicted) pair; 0: no gallery.
        gallery_max: misclassified windows in a model's gallery in all.

    Raises:
        ConfigError: a value outside its rule, naming it.
    """

    enabled: bool = True
    images_per_class: int = 32
    occlusion_per_class: int = 4
    gallery_per_pair: int = 3
    gallery_max: int = 24

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"enabled={self.enabled!r} must be true or false", keys=("enabled",))
        rules = {
            "images_per_class": (1, "test images per class averaged into each map"),
            "occlusion_per_class": (0, "test images per class masked (0: no occlusion check)"),
            "gallery_per_pair": (0, "mistakes shown per confused pair of classes (0: none)"),
            "gallery_max": (1, "mistakes shown per model in all"),
        }
        for key, (minimum, what) in rules.items():
            value = getattr(self, key)
            if not is_whole(value, minimum=minimum):
                raise ConfigError(
                    f"{key}={value!r} must be a whole number of at least {minimum}: {what}",
                    keys=(key,),
                )


def settings_from(values: Mapping | None) -> ExplainSettings:
    """:class:`ExplainSettings` from a plain mapping (the config's ``explain`` node).

    Raises:
        ConfigError: an unknown key, or a value outside its rule.
    """
    values = dict(values or {})
    known = [f.name for f in fields(ExplainSettings)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{unknown[0]} is not an explanation setting; known: {', '.join(known)}",
            keys=(unknown[0],),
        )
    return ExplainSettings(**values)


def cam_layer(module: nn.Module) -> nn.Module | None:
    """The layer Grad-CAM reads: a ResNet's (or its plain twin's) last stage, whose output is
    (N, C, h, w); None for a network without one (the 1-D ResNet takes the raw window)."""
    module = getattr(module, "_orig_mod", module)
    if getattr(module, "input_kind", "image") != "image":
        return None
    layers = getattr(module, "layers", None)
    return layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None


def grad_cam(
    module: nn.Module,
    layer: nn.Module,
    images: Tensor,
    targets: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 64,
) -> np.ndarray:
    """Grad-CAM maps of ``images`` for the classes ``targets``, upsampled to the image.

    A forward hook makes ``layer``'s activations A (C, h, w) where the graph starts (the
    layers before it keep nothing for a backward pass, so the memory is the head's), and A's
    gradient is taken from the target class's logit; each channel is weighted by its gradient's mean
    over (h, w), and the map is ReLU(sum_k alpha_k A_k) (Selvaraju et al., eqs. 1 and 2),
    upsampled bilinearly to (height, width) and divided by its maximum, so every image
    counts alike in a class mean (an all-zero map stays zero). Computed in float32, in
    evaluation mode; the weights' gradients are not touched.

    Args:
        module: the network (logits (N, n_classes)); ``layer`` one of its modules.
        images: normalised images (n, channels, height, width).
        targets: the class index (n,) whose logit each map explains.

    Returns:
        Maps (n, height, width), float32 in [0, 1].
    """
    kept: dict[str, Tensor] = {}

    def keep(_module, _inputs, output: Tensor) -> Tensor:
        # The graph starts at A: with no weight or input needing a gradient, the layers
        # before it keep no activations (at 128x64 images a batch's whole graph took 2 GB).
        kept["a"] = output.detach().float().requires_grad_(True)
        return kept["a"]

    handle = layer.register_forward_hook(keep)
    was_training = module.training
    needs_grad = [p.requires_grad for p in module.parameters()]
    module.eval()
    module.requires_grad_(False)
    maps = []
    try:
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device, torch.float32)
            t = torch.as_tensor(targets[i : i + batch_size], device=device, dtype=torch.long)
            with torch.enable_grad():
                score = module(x).float().gather(1, t[:, None]).sum()
                a = kept.pop("a")
                (g,) = torch.autograd.grad(score, a)  # (b, C, h, w), as a
            cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * a.detach()).sum(1, keepdim=True))
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear")[:, 0]
            peak = cam.amax(dim=(1, 2), keepdim=True)  # (b, 1, 1)
            maps.append((cam / torch.where(peak > 0, peak, 1.0)).cpu())
    finally:
        handle.remove()
        for param, flag in zip(module.parameters(), needs_grad, strict=True):
            param.requires_grad_(flag)
        module.train(was_training)
    return torch.cat(maps).numpy()


def first_per_class(y: np.ndarray, n_classes: int, k: int) -> np.ndarray:
    """Indices of the first ``k`` items of each class, class by class."""
    return np.concatenate([np.flatnonzero(y == c)[:k] for c in range(n_classes)]).astype(int)


def class_means(values, y: np.ndarray, n_classes: int, chunk: int = 2048) -> np.ndarray:
    """The mean of ``values`` (n, ...) over each class's items: (n_classes, ...), NaN for a
    class without any. ``values`` is an array or an :class:`~pipeline.features.view.ImageView`,
    read ``chunk`` items at a time."""
    sums = np.zeros((n_classes, *values.shape[1:]))
    for i in range(0, len(values), chunk):
        np.add.at(sums, y[i : i + chunk], np.asarray(values[i : i + chunk]))
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    counts = counts.reshape(-1, *([1] * (sums.ndim - 1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def peak_band(profile: np.ndarray) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of the band around the peak of a frequency ``profile`` (height,): the
    contiguous rows at or above half the peak's height over the profile's minimum (the full
    width at half maximum); the whole range for a flat profile."""
    p = profile - profile.min()
    top = int(np.argmax(p))
    if not p[top] > 0:
        return 0, len(p)
    above = p >= 0.5 * p[top]
    lo, hi = top, top + 1
    while lo > 0 and above[lo - 1]:
        lo -= 1
    while hi < len(p) and above[hi]:
        hi += 1
    return lo, hi


def _hz_to_mel(hz: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    # Slaney's: linear below 1 kHz, logarithmic above (librosa's htk=False)
    hz = np.asarray(hz, dtype=np.float64)
    log_part = 15.0 + 27.0 * np.log(np.maximum(hz, 1e-9) / 1000.0) / np.log(6.4)
    return np.where(hz < 1000.0, 3.0 * hz / 200.0, log_part)


def _mel_to_hz(mel: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * 6.4 ** ((mel - 15.0) / 27.0))


def row_edges_hz(
    n_rows: int, *, extent: tuple[float, float, float, float], features: Mapping, rate: int
) -> np.ndarray:
    """The frequency in Hz of the ``n_rows + 1`` row edges of an image drawn with ``extent``
    (:func:`pipeline.report._image_extent`): linear bins from the extent's bottom to top; mel
    bands through the filterbank's scale, band ``b``'s centre at the ``b + 1``-th of the
    ``n_mels + 2`` points evenly spaced in mel from ``f_min`` to ``f_max``."""
    bottom, top = extent[2], extent[3]
    edges = np.linspace(bottom, top, n_rows + 1)
    if not features.get("n_mels"):
        return edges
    scale = features.get("mel_scale") or "htk"
    f_max = features.get("f_max") or rate / 2
    lo, hi = _hz_to_mel(np.array([features.get("f_min") or 0.0, f_max]), scale)
    step = (hi - lo) / (features["n_mels"] + 1)
    return _mel_to_hz(lo + (edges + 0.5) * step, scale)


def band_text(lo_hz: float, hi_hz: float) -> str:
    """``"2.80-3.44 kHz"`` or ``"120-250 Hz"``: a band, in kHz (10 Hz steps) where it reaches
    1 kHz, else in Hz."""
    if hi_hz >= 1000:
        return f"{lo_hz / 1000:.2f}-{hi_hz / 1000:.2f} kHz"
    return f"{lo_hz:.0f}-{hi_hz:.0f} Hz"


def class_probabilities(
    module: nn.Module, images: Tensor, targets: np.ndarray, *, device: torch.device
) -> np.ndarray:
    """The softmax probability (n,) each image gives its class in ``targets``."""
    logits = predict_logits(module, images, device=device, amp=False)
    probs = torch.softmax(logits.double(), dim=1).numpy()
    return probs[np.arange(len(targets)), targets]


def occlusion_check(
    module: nn.Module,
    images: Tensor,
    targets: np.ndarray,
    maps: np.ndarray,
    *,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """How much masking an image's top-attention band lowers its class probability, against
    masking random bands of the same height.

    The band is :data:`BAND_FRACTION` of the image height (at least one row); the top band
    is the one holding most of the image's own map (averaged over time); the random bands
    (:data:`RANDOM_BANDS` per image) start anywhere, drawn from ``seed``. Masked rows take
    0, which after normalisation is the training images' mean.

    Args:
        images: normalised images (n, channels, height, width); targets: their classes (n,).
        maps: their Grad-CAM maps (n, height, width).

    Returns:
        {"images", "band_rows", "random_bands", "top_drop", "random_drop", "top_larger"}: the
        mean drops in probability and the fraction of images whose top-band drop exceeds
        the mean of their random-band drops.
    """
    n, height = len(images), images.shape[-2]
    rows = max(1, round(height * BAND_FRACTION))
    sums = np.lib.stride_tricks.sliding_window_view(maps.mean(axis=-1), rows, axis=1).sum(-1)
    starts = np.concatenate(
        [
            sums.argmax(axis=1)[:, None],  # (n, 1): the top band
            np.random.default_rng(seed).integers(0, height - rows + 1, size=(n, RANDOM_BANDS)),
        ],
        axis=1,
    )  # (n, 1 + RANDOM_BANDS)
    masked = images[:, None].repeat(1, starts.shape[1], 1, 1, 1)  # (n, 1 + R, C, H, W)
    for i, j in np.ndindex(starts.shape):
        masked[i, j, :, starts[i, j] : starts[i, j] + rows] = 0.0
    base = class_probabilities(module, images, targets, device=device)
    after = class_probabilities(
        module, masked.flatten(0, 1), np.repeat(targets, starts.shape[1]), device=device
    ).reshape(starts.shape)
    drops = base[:, None] - after  # (n, 1 + R)
    return {
        "images": int(n),
        "band_rows": int(rows),
        "random_bands": RANDOM_BANDS,
        "top_drop": float(drops[:, 0].mean()),
        "random_drop": float(drops[:, 1:].mean()),
        "top_larger": float(np.mean(drops[:, 0] > drops[:, 1:].mean(axis=1))),
    }


def select_mistakes(
    y: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, *, per_pair: int, limit: int
) -> list[int]:
    """The misclassified items a gallery shows: at most ``per_pair`` per (true, predicted)
    pair, at most ``limit`` in all, the most confident mistakes first.

    Args:
        y: true classes (n,); predicted: predicted classes (n,).
        confidence: the probability each item's prediction was given (n,).

    Returns:
        Indices into the items, in decreasing confidence (ties: in item order).
    """
    wrong = np.flatnonzero(predicted != y)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")]
    taken: Counter = Counter()
    picks = []
    for i in order:
        pair = (int(y[i]), int(predicted[i]))
        if taken[pair] < per_pair:
            taken[pair] += 1
            picks.append(int(i))
    return picks[:limit]


def gallery(
    probabilities: np.ndarray,
    y: np.ndarray,
    *,
    classes: list[str],
    paths: list[str],
    starts: np.ndarray,
    per_pair: int,
    limit: int,
    predicted: np.ndarray | None = None,
) -> dict:
    """A model's mistakes on the test split, for metrics.json and the report.

    Args:
        probabilities: class probabilities (n, n_classes) of the test windows.
        y: their true classes (n,).
        paths: each window's file; starts: its start in the file in seconds.
        predicted: the classes predicted (n,); None: the argmax of ``probabilities``.

    Returns:
        {"misclassified", "pairs", "shown"}: the number of misclassified windows, the
        number of confused (true, predicted) pairs, and the windows chosen by
        :func:`select_mistakes`, each {"index", "path", "start_seconds", "true",
        "predicted", "confidence"}.
    """
    predicted = probabilities.argmax(1) if predicted is None else np.asarray(predicted)
    confidence = probabilities[np.arange(len(y)), predicted]
    picks = select_mistakes(y, predicted, confidence, per_pair=per_pair, limit=limit)
    wrong = predicted != y
    shown = [
        {
            "index": i,
            "path": str(paths[i]),
            "start_seconds": float(starts[i]),
            "true": classes[int(y[i])],
            "predicted": classes[int(predicted[i])],
            "confidence": float(confidence[i]),
        }
        for i in picks
    ]
    pairs = {(int(a), int(b)) for a, b in zip(y[wrong], predicted[wrong], strict=True)}
    return {"misclassified": int(wrong.sum()), "pairs": len(pairs), "shown": shown}


def no_map_reason(fitted) -> str | None:
    """Why a fitted model gets no Grad-CAM map, in a few words; None when it gets one."""
    if not isinstance(fitted, nn.Module):
        return "it is not a network: no convolutional stage and no gradients to weight it by"
    if getattr(getattr(fitted, "_orig_mod", fitted), "input_kind", "image") != "image":
        return "it takes the raw window, which has no frequency axis"
    if cam_layer(fitted) is None:
        return "it has no convolutional stage to read a map from"
    return None


def network_maps(
    module: nn.Module,
    images: Tensor,
    y: np.ndarray,
    *,
    classes: list[str],
    edges_hz: np.ndarray,
    settings: ExplainSettings,
    device: torch.device,
    seed: int = 0,
) -> tuple[dict, np.ndarray]:
    """A network's Grad-CAM maps per class, their frequency profiles and peak bands, and the
    occlusion check, on the first test images of each class.

    Args:
        module: the network; images: the normalised test images (n, C, H, W); y: classes (n,).
        edges_hz: the frequency of the H + 1 row edges (:func:`row_edges_hz`).

    Returns:
        ``(summary, maps)``: the summary for metrics.json ({"layer", "images", "classes":
        {class: {"images", "peak_rows", "peak_hz", "peak_text", "profile"}}, "occlusion"})
        and the class maps (n_classes, H, W), NaN for a class without a test image.
    """
    layer = cam_layer(module)
    module = getattr(module, "_orig_mod", module)
    k = max(settings.images_per_class, settings.occlusion_per_class)
    pick = first_per_class(y, len(classes), k)
    # each picked image's rank within its class (picks run class by class)
    rank = np.concatenate([np.arange((y[pick] == c).sum()) for c in range(len(classes))])
    cams = grad_cam(module, layer, images[pick], y[pick], device=device)
    use = rank < settings.images_per_class
    maps = class_means(cams[use], y[pick][use], len(classes))  # (n_classes, H, W)
    per_class = {}
    for c, name in enumerate(classes):
        if np.isnan(maps[c]).any():
            continue
        profile = maps[c].mean(axis=-1)  # (H,): attention averaged over time
        lo, hi = peak_band(profile)
        per_class[name] = {
            "images": int((y[pick][use] == c).sum()),
            "peak_rows": [lo, hi],
            "peak_hz": [float(edges_hz[lo]), float(edges_hz[hi])],
            "peak_text": band_text(float(edges_hz[lo]), float(edges_hz[hi])),
            "profile": [round(float(v), 4) for v in profile],
        }
    summary = {
        "layer": next(n for n, m in module.named_modules() if m is layer),
        "images": int(use.sum()),
        "classes": per_class,
    }
    occ = rank < settings.occlusion_per_class
    if occ.any():
        summary["occlusion"] = occlusion_check(
            module, images[pick][occ], y[pick][occ], cams[occ], device=device, seed=seed
        )
    return summary, maps


def probabilities_of(
    model, x: Tensor, *, device: torch.device, amp: bool, batch_size: int = 256
) -> np.ndarray:
    """A model adapter's class probabilities (n, n_classes) of ``x``, in batches."""
    parts = [
        model.probabilities(x[i : i + batch_size].to(device), device=device, amp=amp)
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(parts)


@dataclass
class TestSet:
    """What the explanation step reads of the test split.

    Attributes:
        inputs: the model's inputs (normalised images, or raw windows), (n, ...).
        y: true classes (n,); predicted: the model's predictions (n,).
        images: the un-normalised images (n, C, H, W), which the figures show.
        paths: each window's file; starts: its start in the file in seconds (n,).
        classes: the class names.
        meta: {"dataset": {"sample_rate", "segment_samples"}, "features": STFT settings}.
    """

    inputs: Tensor
    y: np.ndarray
    predicted: np.ndarray
    images: np.ndarray
    paths: list[str]
    starts: np.ndarray
    classes: list[str]
    meta: dict


def explain_model(
    model,
    test: TestSet,
    *,
    name: str,
    settings: ExplainSettings,
    device: torch.device,
    fig_dir,
    amp: bool = False,
    seed: int = 0,
) -> dict:
    """Grad-CAM maps, occlusion check and gallery of one model adapter on the test split,
    their figures written into ``fig_dir`` (``gradcam_<name>.png``,
    ``gradcam_profile_<name>.png``, ``misclassified_<name>.png``).

    Returns:
        {"map": :func:`network_maps`' summary} or {"no_map": why}, with "gallery"
        (:func:`gallery`), "seconds" (the step's own wall time) and "cpu_seconds" (the
        process's CPU time in it, less sensitive to other work on a shared machine).
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    reason = no_map_reason(model.fitted)
    if reason is None:
        result["map"] = _maps_and_figures(model.fitted, test, name, settings, device, fig_dir, seed)
    else:
        result["no_map"] = reason
    if settings.gallery_per_pair:
        probs = probabilities_of(model, test.inputs, device=device, amp=amp)
        result["gallery"] = gallery(
            probs,
            test.y,
            classes=test.classes,
            paths=test.paths,
            starts=test.starts,
            per_pair=settings.gallery_per_pair,
            limit=settings.gallery_max,
            predicted=test.predicted,
        )
        _gallery_figure(result["gallery"]["shown"], test, name, fig_dir)
    result["seconds"] = time.perf_counter() - t0
    result["cpu_seconds"] = time.process_time() - cpu0  # this process's, all its threads
    log.info(
        "%s: %s, %d of %d misclassified test windows in the gallery, in %.2f s (%.2f s CPU)",
        name,
        f"Grad-CAM maps of {result['map']['images']} test images" if "map" in result else "no map",
        len(result.get("gallery", {}).get("shown", [])),
        int((test.predicted != test.y).sum()),
        result["seconds"],
        result["cpu_seconds"],
    )
    return result


def _maps_and_figures(module, test: TestSet, name, settings, device, fig_dir, seed) -> dict:
    """:func:`network_maps` of one network and its two figures."""
    from pipeline import explain_figures as figures
    from pipeline.report import _image_extent

    extent, ylabel = _image_extent(test.meta)
    rate = test.meta["dataset"]["sample_rate"]
    height = test.images.shape[-2]
    edges = row_edges_hz(height, extent=extent, features=test.meta["features"], rate=rate)
    summary, maps = network_maps(
        module,
        test.inputs,
        test.y,
        classes=test.classes,
        edges_hz=edges,
        settings=settings,
        device=device,
        seed=seed,
    )
    bands = [summary["classes"].get(c, {}).get("peak_hz") for c in test.classes]
    fig = figures.plot_attention(
        class_means(test.images, test.y, len(test.classes))[:, 0],
        maps,
        classes=test.classes,
        captions=[band_text(*b) if b else "no test image" for b in bands],
        extent=extent,
        ylabel=ylabel,
        title=f"{name}: Grad-CAM attention per class over the mean test image",
    )
    figures.save(fig, fig_dir / f"gradcam_{name}.png")
    fig = figures.plot_profiles(
        maps.mean(axis=-1),
        centres_hz=(edges[:-1] + edges[1:]) / 2,
        classes=test.classes,
        bands_hz=bands,
        title=f"{name}: attention per frequency (shaded: each class's peak band)",
    )
    figures.save(fig, fig_dir / f"gradcam_profile_{name}.png")
    return summary


def _gallery_figure(shown: list[dict], test: TestSet, name: str, fig_dir) -> None:
    """The gallery's figure, when the model made mistakes."""
    if not shown:
        return
    from pipeline import explain_figures as figures
    from pipeline.report import _image_extent

    extent, ylabel = _image_extent(test.meta)
    captions = [
        f"{e['true'][:14]} → {e['predicted'][:14]} ({e['confidence']:.2f})\n"
        f"{Path(e['path']).name[:26]} @ {e['start_seconds']:.3g} s"
        for e in shown
    ]
    f = test.meta["features"]
    fig = figures.plot_gallery(
        np.asarray(test.images[[e["index"] for e in shown]])[:, 0],
        captions,
        extent=extent,
        ylabel=ylabel,
        unit="dB" if f.get("scale") == "db" else str(f.get("scale")),
        title=f"{name}: misclassified test images, most confident first (true → predicted)",
    )
    figures.save(fig, fig_dir / f"misclassified_{name}.png")


def section(results: dict[str, dict], *, settings: ExplainSettings) -> dict:
    """The ``explain`` section of metrics.json: the settings, the step's seconds over all
    models, and each model's result (:func:`explain_model`)."""
    return {
        "settings": asdict(settings),
        "band_fraction": BAND_FRACTION,
        "seconds": float(sum(r["seconds"] for r in results.values())),
        "cpu_seconds": float(sum(r["cpu_seconds"] for r in results.values())),
        "models": results,
    }
