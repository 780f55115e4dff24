"""Embedded default dataset: a seeded rotating-machine vibration simulator.

Writes real WAV files into ``<root>/<class>/<class>_<index>.wav`` so the default
run reads them through the same path as user data::

    python -m pipeline.data.synthetic --root data/synthetic --n-per-class 150

Seven classes, each a physical mechanism with its signature in time-frequency
structure (Randall & Antoni 2011, "Rolling element bearing diagnostics - A
tutorial", MSSP 25; ISO 20816 practice for shaft faults):

* ``healthy``: small residual shaft harmonics, background excitation of the
  structural resonance, noise.
* ``imbalance``: a dominant once-per-revolution (1x) component.
* ``misalignment``: a dominant 2x component with 1x and 3x beside it.
* ``looseness``: many harmonics of 1x and half-harmonics (0.5x, 1.5x, ...) from
  a clipped, rattling response.
* ``outer_race``: impulses at the ball-pass frequency of the outer race (BPFO),
  each ringing the structural resonance, constant in amplitude (the fault is fixed).
* ``inner_race``: impulses at BPFI, amplitude-modulated once per revolution as
  the fault passes through the load zone.
* ``ball``: impulses at twice the ball-spin frequency (the ball strikes both
  races), modulated at the cage frequency (FTF), with random strength.

Every file draws its own shaft speed (1200-3000 rpm) with a slow fluctuation,
resonance frequency and damping, fault severity, overall gain and SNR, so no
single frequency or level identifies a class. The fault frequencies follow the
bearing's geometry; the default is the SKF 6205 of the CWRU bearing data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MARKER = ".generated.json"  # hidden: not a signal file, so readers skip it
CLASSES = (
    "healthy",
    "imbalance",
    "misalignment",
    "looseness",
    "outer_race",
    "inner_race",
    "ball",
)
# SKF 6205-2RS JEM, the drive-end bearing of the CWRU data: diameters in mm.
BEARING_6205 = {
    "n_balls": 9,
    "ball_diameter": 7.94,
    "pitch_diameter": 39.04,
    "contact_angle_deg": 0.0,
}
SHAFT_HZ = (20.0, 50.0)
RESONANCE_HZ = (1000.0, 1700.0)
DAMPING = (0.02, 0.08)
BEARING_FAULTS = ("outer_race", "inner_race", "ball")


def bearing_frequencies(
    fr: float,
    *,
    n_balls: int,
    ball_diameter: float,
    pitch_diameter: float,
    contact_angle_deg: float,
) -> dict[str, float]:
    """Characteristic fault frequencies of a rolling-element bearing (Randall & Antoni 2011, eq. 1).

    Args:
        fr: shaft rotation frequency in Hz (inner race turning, outer race fixed).
        n_balls: number of rolling elements.
        ball_diameter: rolling-element diameter d.
        pitch_diameter: pitch diameter D, in the unit of ``ball_diameter``.
        contact_angle_deg: contact angle.

    Returns:
        ``bpfo``, ``bpfi``, ``bsf`` (ball spin) and ``ftf`` (cage) in Hz.
    """
    r = ball_diameter / pitch_diameter * np.cos(np.deg2rad(contact_angle_deg))
    return {
        "bpfo": n_balls * fr / 2 * (1 - r),
        "bpfi": n_balls * fr / 2 * (1 + r),
        "bsf": pitch_diameter / (2 * ball_diameter) * fr * (1 - r**2),
        "ftf": fr / 2 * (1 - r),
    }


def resonance_filter(fn: float, zeta: float, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """IIR (b, a) of a damped single-degree-of-freedom resonance, by impulse invariance.

    Its impulse response is ``exp(-zeta*wn*t) * sin(wd*t)``: the ringing that one
    bearing impact excites in the machine structure.
    """
    wn = 2 * np.pi * fn
    wd = wn * np.sqrt(1 - zeta**2)
    T = 1 / sample_rate
    r = np.exp(-zeta * wn * T)
    return np.array([0.0, r * np.sin(wd * T)]), np.array([1.0, -2 * r * np.cos(wd * T), r**2])


def simulate(
    label: str,
    *,
    rng: np.random.Generator,
    sample_rate: int,
    n_samples: int,
    snr_db: Sequence[float],
    shaft_hz: float | None = None,
    bearing: dict | None = None,
) -> np.ndarray:
    """One vibration signal of class ``label``.

    Args:
        label: one of :data:`CLASSES`.
        rng: the file's own generator.
        sample_rate: samples per second.
        n_samples: length of the signal.
        snr_db: (low, high) range of the ratio of the class's own component to
            the broadband noise, drawn uniformly per file.
        shaft_hz: shaft speed; drawn from :data:`SHAFT_HZ` when None.
        bearing: bearing geometry for :func:`bearing_frequencies`; the 6205 when None.

    Returns:
        float32 array (n_samples,), scaled to an RMS of about 0.1 with a random
        gain, so level alone does not give the class away.
    """
    if label not in CLASSES:
        raise ConfigError(f"label={label!r} must be one of {list(CLASSES)}")
    t = np.arange(n_samples) / sample_rate
    fr0 = rng.uniform(*SHAFT_HZ) if shaft_hz is None else shaft_hz
    theta = _shaft_angle(t, fr0, rng=rng, sample_rate=sample_rate)  # (n_samples,)
    b, a = resonance_filter(rng.uniform(*RESONANCE_HZ), rng.uniform(*DAMPING), sample_rate)
    # Every machine: residual unbalance and misalignment, and the structure ringing
    # under random forcing.
    base = _harmonics(theta, [1, 2, 3], rng.uniform(0.05, 0.2, 3), rng=rng)
    base = base + scipy.signal.lfilter(b, a, rng.standard_normal(n_samples)) * rng.uniform(
        0.002, 0.01
    )
    severity = rng.uniform(0.5, 1.5)
    if label in BEARING_FAULTS:
        part = _bearing_fault(
            label,
            rng=rng,
            theta=theta,
            fr=fr0,
            sample_rate=sample_rate,
            filt=(b, a),
            bearing=bearing or BEARING_6205,
            severity=severity,
        )
    else:
        part = _shaft_fault(label, rng=rng, theta=theta, severity=severity)
    return _add_noise(base, part, rng=rng, snr_db=snr_db, healthy=label == "healthy")


def _shaft_angle(
    t: np.ndarray, fr0: float, *, rng: np.random.Generator, sample_rate: int
) -> np.ndarray:
    """The shaft angle theta (n_samples,) at speed ``fr0`` with a slow fluctuation of about 1 %."""
    fr_t = fr0 * (
        1 + 0.01 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t + rng.uniform(0, 2 * np.pi))
    )
    return 2 * np.pi * np.cumsum(fr_t) / sample_rate + rng.uniform(0, 2 * np.pi)


def _harmonics(theta: np.ndarray, orders, amps, *, rng: np.random.Generator) -> np.ndarray:
    """Sum of sines at ``orders`` of the shaft angle, each with its own random phase."""
    return sum(
        amp * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
        for k, amp in zip(orders, amps, strict=True)
    )


def _shaft_fault(
    label: str, *, rng: np.random.Generator, theta: np.ndarray, severity: float
) -> np.ndarray:
    """The component (n_samples,) of a class without a bearing fault: shaft harmonics or none."""
    if label == "healthy":
        return np.zeros(theta.size)
    if label == "imbalance":
        return _harmonics(theta, [1], [severity], rng=rng)
    if label == "misalignment":
        amps = severity * np.array([rng.uniform(0.2, 0.5), 1.0, rng.uniform(0.1, 0.4)])
        return _harmonics(theta, [1, 2, 3], amps, rng=rng)
    # looseness: many harmonics and half-harmonics, clipped like a rattling response
    orders = np.arange(0.5, 10.5, 0.5)
    amps = severity * rng.uniform(0.3, 1.0, orders.size) / np.sqrt(orders)
    amps[orders % 1 != 0] *= rng.uniform(0.3, 0.7)  # half-harmonics: rattling once every two turns
    raw = _harmonics(theta, orders, amps, rng=rng)
    return np.clip(raw, -0.6 * np.abs(raw).max(), 0.6 * np.abs(raw).max())


def _add_noise(
    base: np.ndarray,
    part: np.ndarray,
    *,
    rng: np.random.Generator,
    snr_db: Sequence[float],
    healthy: bool,
) -> np.ndarray:
    """``base + part`` with broadband noise at a drawn SNR, at an RMS of about 0.1, float32.

    The SNR is that of the class's own component ``part`` (of ``base`` for a healthy
    machine, which has none).
    """
    signal = base + part
    reference = np.mean(part**2) if not healthy else np.mean(base**2)
    snr = rng.uniform(*snr_db)
    noise = rng.standard_normal(base.size) * np.sqrt(reference / 10 ** (snr / 10))
    x = signal + noise
    x *= 0.1 * rng.uniform(0.7, 1.4) / np.sqrt(np.mean(x**2))
    return x.astype(np.float32)


def _bearing_fault(label, *, rng, theta, fr, sample_rate, filt, bearing, severity) -> np.ndarray:
    """Impulses at the fault's characteristic frequency, each ringing the resonance."""
    freqs = bearing_frequencies(fr, **bearing)
    rate = {"outer_race": freqs["bpfo"], "inner_race": freqs["bpfi"], "ball": 2 * freqs["bsf"]}[
        label
    ]
    n = theta.size
    period = sample_rate / rate
    # Rolling elements slip: spacing jitters by 1-2 % (Randall & Antoni 2011, sec. 2.1).
    spacing = period * (1 + rng.uniform(0.01, 0.02) * rng.standard_normal(int(n / period) + 2))
    positions = rng.uniform(0, period) + np.concatenate([[0.0], np.cumsum(spacing)])
    positions = positions[positions < n - 1].astype(int)
    if label == "outer_race":
        amps = np.ones(positions.size)
    elif label == "inner_race":
        # The fault turns with the shaft: strong inside the load zone, weak outside.
        amps = 0.2 + np.maximum(0.0, np.cos(theta[positions])) ** 1.5
    else:
        cage_phase = 2 * np.pi * freqs["ftf"] * positions / sample_rate + rng.uniform(0, 2 * np.pi)
        amps = (0.3 + 0.7 * np.maximum(0.0, np.cos(cage_phase))) * rng.lognormal(
            0, 0.4, positions.size
        )
    impulses = np.zeros(n)
    impulses[positions] = amps
    b, a = filt
    ringing = scipy.signal.lfilter(b, a, impulses)
    return severity * ringing / (np.sqrt(np.mean(ringing**2)) + 1e-12) * 0.5


def _check(name: str, value, *, positive: bool = True) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (positive and not value > 0)
    ):
        raise ConfigError(f"data.generate.{name}={value!r} must be a positive number")


def _params(n_per_class, sample_rate, duration_seconds, snr_db, seed) -> dict:
    _check("n_per_class", n_per_class)
    if not isinstance(n_per_class, int):
        raise ConfigError(f"data.generate.n_per_class={n_per_class!r} must be a positive integer")
    _check("sample_rate", sample_rate)
    _check("duration_seconds", duration_seconds)
    if len(snr_db) != 2 or snr_db[0] > snr_db[1]:
        raise ConfigError(
            f"data.generate.snr_db={list(snr_db)} must be [low, high] in dB with low <= high"
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"data.generate.seed={seed!r} must be an integer")
    return {
        "version": GENERATOR_VERSION,
        "classes": list(CLASSES),
        "n_per_class": n_per_class,
        "sample_rate": int(sample_rate),
        "duration_seconds": float(duration_seconds),
        "snr_db": [float(v) for v in snr_db],
        "seed": seed,
    }


def generate(
    root: str | Path,
    *,
    n_per_class: int = 150,
    sample_rate: int = 4000,
    duration_seconds: float = 1.0,
    snr_db: Sequence[float] = (-6.0, 12.0),
    seed: int = 0,
) -> Path:
    """Write the dataset into ``root`` (files of an earlier generation are replaced).

    Each file's generator derives from (seed, class, index), so a file does not
    depend on how many others are generated. Files are written to a temporary
    name and renamed; ``.generated.json``, written last, marks a complete dataset.

    Returns:
        ``root``.
    """
    params = _params(n_per_class, sample_rate, duration_seconds, snr_db, seed)
    root = Path(root)
    _remove_generated(root)
    n_samples = round(duration_seconds * sample_rate)
    for c, label in enumerate(CLASSES):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            rng = np.random.default_rng(np.random.SeedSequence([seed, c, i]))
            x = simulate(
                label, rng=rng, sample_rate=sample_rate, n_samples=n_samples, snr_db=snr_db
            )
            _write_wav(folder / f"{label}_{i:04d}.wav", x, int(sample_rate))
    marker = {**params, "n_files": n_per_class * len(CLASSES)}
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".marker.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(marker, f, indent=2)
    os.replace(tmp, root / MARKER)
    log.info("wrote %d files into %s", marker["n_files"], root)
    return root


def ensure_dataset(root: str | Path, **params) -> Path:
    """Generate the dataset into ``root`` unless a complete one with these parameters is there.

    Raises:
        ConfigError: ``root`` holds other files and no generator marker, so it is
            not ours to overwrite.
    """
    root = Path(root)
    wanted = _params(**{**_defaults(), **params})
    marker = root / MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        found.pop("n_files", None)
        if found == wanted:
            log.info("using the generated dataset in %s", root)
            return root
        log.info("generator settings changed: regenerating %s", root)
    elif root.exists() and any(root.iterdir()):
        raise ConfigError(
            f"data.root={str(root)!r} holds files that the generator did not write; point "
            "data.root at an empty or new folder, or use data=folder for your own recordings"
        )
    else:
        log.info("generating the default dataset into %s (first run only)", root)
    return generate(root, **{k: wanted[k] for k in _defaults()})


def _defaults() -> dict:
    return {
        "n_per_class": 150,
        "sample_rate": 4000,
        "duration_seconds": 1.0,
        "snr_db": (-6.0, 12.0),
        "seed": 0,
    }


def _remove_generated(root: Path) -> None:
    """Delete what an earlier generation wrote (its WAV files and the marker), nothing else."""
    (root / MARKER).unlink(missing_ok=True)
    for label in CLASSES:
        folder = root / label
        if folder.is_dir():
            for path in folder.glob(f"{label}_*.wav"):
                path.unlink()


def _write_wav(path: Path, x: np.ndarray, sample_rate: int) -> None:
    # 32-bit float keeps quiet components exact; PCM_16 would quantise them.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".wav")
    os.close(fd)
    try:
        sf.write(tmp, x, sample_rate, subtype="FLOAT")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/synthetic")
    parser.add_argument("--n-per-class", type=int, default=150)
    parser.add_argument("--sample-rate", type=int, default=4000)
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per file")
    parser.add_argument(
        "--snr-db", type=float, nargs=2, default=(-6.0, 12.0), metavar=("LOW", "HIGH")
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        generate(
            args.root,
            n_per_class=args.n_per_class,
            sample_rate=args.sample_rate,
            duration_seconds=args.duration,
            snr_db=args.snr_db,
            seed=args.seed,
        )
    except ConfigError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
