"""A bundle's whole classifier as one module that exports to ONNX: waveform in, probabilities out.

    waveform (batch, channels, samples), float32 at the bundle's rate and window length
      --pad (center)--> conv1d with the windowed DFT basis --> re² + im² (power) or its root
      --> mel filterbank (a matrix product) or the frequency crop --> dB with top_db, or log1p
      --> cepstral smoothing (a matrix product) --> resize (two averaging matrices)
      --> per-image standardisation --> the training statistics (global or per frequency row)
      --> the network --> logits --> softmax(logits / temperature) --> probabilities

For a raw-input bundle (``resnet1d``) the window's standardisation (``window_norm``) replaces
the image steps. Every step is a real-valued ONNX operator (Pad, Conv, Mul, MatMul, Log,
ReduceMax, ReduceMean, ...), so the graph runs on any ONNX runtime, including those without
ONNX's STFT operator (opset 17) or complex numbers.
The DFT as a convolution with a fixed basis (cos and -sin rows times the window) computes the
same sums as ``torch.stft``; a frame's bins differ from the FFT's by float32 rounding only.

``adaptive_avg_pool2d`` is written as two matrices (the mean over each output pixel's rows,
then its columns), because ONNX has no adaptive pooling for sizes that do not divide.

What a single window cannot carry is refused here (:func:`check_exportable`): the per-group
profiles of ``features.per_group`` need a pass over each group's files first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.calibration import bundle_temperature
from pipeline.errors import BundleError
from pipeline.features.stft import (
    STFTParams,
    cepstral_smoother,
    make_window,
    mel_filters,
)
from pipeline.frontend import FLAT, Frontend, WindowNorm

# torchaudio's amplitude_to_DB floor (pipeline.features.stft._scale passes it)
AMIN = 1e-10


def dft_basis(params: STFTParams) -> Tensor:
    """The windowed one-sided DFT as conv1d weights (2 * (n_fft // 2 + 1), 1, n_fft): the
    real parts' rows, then the imaginary parts'.

    ``torch.stft`` centres a window shorter than ``n_fft`` in the frame, zeros on both sides.
    The angles are computed in float64 (``k * n mod n_fft`` exactly), then rounded once.
    """
    n_fft = params.n_fft
    window = torch.zeros(n_fft, dtype=torch.float64)
    left = (n_fft - params.win_length) // 2
    window[left : left + params.win_length] = make_window(params).double()
    k = torch.arange(n_fft // 2 + 1, dtype=torch.int64)[:, None]
    n = torch.arange(n_fft, dtype=torch.int64)[None, :]
    angle = 2 * math.pi * ((k * n) % n_fft).double() / n_fft  # (freq, n_fft)
    basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window
    return basis.float()[:, None, :]


def n_frames(params: STFTParams, samples: int) -> int:
    """The frame count of :class:`ConvSpectrogram` (``torch.stft``'s) for ``samples``."""
    padded = samples + (2 * (params.n_fft // 2) if params.center else 0)
    return 1 + (padded - params.n_fft) // params.hop_length


def pool_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in): row i averages inputs floor(i * n_in / n_out) to ceil((i + 1) * n_in /
    n_out), the bins of ``adaptive_avg_pool``."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        a, b = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m.float()


class ConvSpectrogram(nn.Module):
    """``|STFT|**power`` by a strided conv1d: (batch, channels, samples) -> (batch, channels,
    n_fft // 2 + 1, frames), as :func:`torchaudio.functional.spectrogram` with the settings."""

    def __init__(self, params: STFTParams) -> None:
        super().__init__()
        self.params = params
        self.register_buffer("basis", dft_basis(params))

    def forward(self, x: Tensor) -> Tensor:
        p = self.params
        batch, channels, samples = x.shape
        x = x.reshape(batch * channels, 1, samples)
        if p.center:
            x = nn.functional.pad(x, (p.n_fft // 2, p.n_fft // 2), mode=p.pad_mode)
        out = nn.functional.conv1d(x, self.basis, stride=p.hop_length)  # (b*c, 2 * freq, frames)
        n_freq = p.n_fft // 2 + 1
        re, im = out[:, :n_freq], out[:, n_freq:]
        spec = re * re + im * im  # power
        if p.power == 1:
            spec = torch.sqrt(spec)
        return spec.reshape(batch, channels, n_freq, spec.shape[-1])


class ImageFront(nn.Module):
    """Windows (batch, channels, samples) -> the network's normalised images (batch,
    channels, height, width), as :meth:`pipeline.frontend.Frontend.images` computes them."""

    def __init__(self, frontend: Frontend) -> None:
        super().__init__()
        p = frontend.params
        norm = frontend.normalizer
        self.params, self.per_image = p, norm.per_image
        self.float16 = p.dtype == "float16"
        self.spectrogram = ConvSpectrogram(p)
        self.band = p.uses_band and p.n_mels is None  # a linear crop
        self.lo, self.hi = p.bins()
        self.register_buffer("mel", mel_filters(p).T.contiguous() if p.n_mels else None)
        smoother = cepstral_smoother(p.n_freq(), p.lifter) if p.lifter is not None else None
        self.register_buffer("smoother", smoother)
        frames = n_frames(p, frontend.segmenting.length)
        self.register_buffer("rows", None if p.size is None else pool_matrix(p.n_freq(), p.size[0]))
        cols = None if p.size is None else pool_matrix(frames, p.size[1]).T.contiguous()
        self.register_buffer("cols", cols)
        self.register_buffer("mean", torch.as_tensor(norm.mean))
        self.register_buffer("std", torch.as_tensor(norm.std))

    def forward(self, x: Tensor) -> Tensor:
        spec = self.spectrogram(x)  # (batch, channels, n_fft // 2 + 1, frames)
        if self.mel is not None:
            spec = torch.matmul(self.mel, spec)  # (n_mels, freq) @ (..., freq, frames)
        elif self.band:
            spec = spec[:, :, self.lo : self.hi + 1]
        spec = self.scale(spec)
        if self.smoother is not None:
            spec = torch.matmul(self.smoother, spec)  # each frame's log spectrum smoothed
        if self.rows is not None:
            spec = torch.matmul(torch.matmul(self.rows, spec), self.cols)  # (..., height, width)
        if self.float16:  # the images the model was trained on were rounded so (the cache's)
            spec = spec.to(torch.float16).to(torch.float32)
        if self.per_image:
            spec = standardise_each(spec, self.per_image)
        return (spec - self.mean) / self.std

    def scale(self, spec: Tensor) -> Tensor:
        """dB (floored ``top_db`` below each image's peak over channels, rows and frames),
        log1p, or the spectrum as it is; torchaudio's ``amplitude_to_DB`` written out."""
        p = self.params
        if p.scale == "db":
            multiplier = 10.0 if p.power == 2 else 20.0
            # maximum, not clamp: ONNX's Clip without a max clips inf to float32's largest value
            # in onnxruntime, where torch keeps inf (and predict refuses the window)
            floor = torch.full((), AMIN, dtype=spec.dtype)
            db = (multiplier / math.log(10.0)) * torch.log(torch.maximum(spec, floor))
            if p.top_db is None:
                return db
            peak = torch.amax(db, dim=(1, 2, 3), keepdim=True)
            return torch.maximum(db, peak - p.top_db)
        if p.scale == "log1p":
            return torch.log1p(spec)
        return spec


def standardise_each(images: Tensor, how: bool | str) -> Tensor:
    """``features.per_image``: each image minus its mean (each row's, for ``freq``), over its
    standard deviation after that; :func:`pipeline.features.stft._standardise_each`."""
    mean_dims = (3,) if how == "freq" else (1, 2, 3)
    centred = images - images.mean(dim=mean_dims, keepdim=True)
    std = torch.sqrt(torch.mean(centred * centred, dim=(1, 2, 3), keepdim=True))
    return centred / torch.maximum(std, torch.full((), 1e-6, dtype=std.dtype))


class RawFront(nn.Module):
    """Raw windows standardised as the bundle's ``window_norm`` says (:class:`WindowNorm`)."""

    def __init__(self, norm: WindowNorm) -> None:
        super().__init__()
        self.per_window = norm.mode == "window"
        self.register_buffer("mean", torch.as_tensor(norm.mean))  # (channels, 1)
        self.register_buffer("std", torch.as_tensor(norm.std))

    def forward(self, x: Tensor) -> Tensor:
        if not self.per_window:
            return (x - self.mean) / self.std
        mean = x.mean(dim=-1, keepdim=True)
        centred = x - mean
        std = torch.sqrt(torch.mean(centred * centred, dim=-1, keepdim=True))
        flat = std <= FLAT * torch.amax(torch.abs(x), dim=-1, keepdim=True)
        return torch.where(flat, torch.zeros_like(x), centred / torch.where(flat, 1.0, std))


class WaveformClassifier(nn.Module):
    """(batch, channels, samples) -> (probabilities, logits), each (batch, classes).

    Args:
        front: :class:`ImageFront` or :class:`RawFront`.
        network: the bundle's network, in eval mode.
        temperature: logits are divided by it before the softmax (1: none).
    """

    def __init__(self, front: nn.Module, network: nn.Module, *, temperature: float = 1.0):
        super().__init__()
        self.front, self.network, self.temperature = front, network, float(temperature)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        inputs = self.front(x)
        logits = self.network(inputs)
        probs = torch.softmax(logits / self.temperature, dim=1)
        # A window whose image is not finite (its power spectrum overflows float32) gets a row
        # of NaN, as predict gives it (pipeline.features.stft.finite_images) and reports it.
        finite = torch.isfinite(inputs).flatten(1).all(dim=1, keepdim=True)
        return torch.where(finite, probs, torch.nan), logits


def check_exportable(bundle, *, key: str = "export.model") -> None:
    """Refuse a bundle whose front end one window cannot reproduce.

    Raises:
        BundleError: the bundle uses ``features.per_group`` (each group's mean frequency
            profile comes from a first pass over that group's files).
    """
    if bundle.normalizer.per_group and bundle.meta.get("input", "image") == "image":
        raise BundleError(
            f"{key}: the bundle was trained with features.per_group="
            f"{bundle.normalizer.per_group}, whose group profiles come from a pass over each "
            "group's files, which a waveform-in graph cannot hold; export it with "
            "export.input=image (the network on images with the profile removed)"
        )


def waveform_classifier(bundle, network: nn.Module) -> WaveformClassifier:
    """The module of a network bundle, waveform in (see the module docstring)."""
    frontend = Frontend.from_bundle(bundle)
    kind = getattr(network, "input_kind", "image")
    front = RawFront(frontend.window_norm) if kind == "raw" else ImageFront(frontend)
    temperature = bundle_temperature(bundle.meta, file="bundle.json")  # predict's, 1.0 if absent
    return WaveformClassifier(front, network.eval(), temperature=temperature)
