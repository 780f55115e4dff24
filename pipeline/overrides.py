"""Check the command line's overrides against the configuration before Hydra runs.

Hydra refuses an unknown key with "Key 'x' is not in struct" (exit status 1) and
suggests adding ``+``; with ``+`` the key is added and nothing reads it, so a typo
like ``+data.segment.length=1.0`` runs with the default and exits 0. Here every
key an override sets (plain, ``+`` or ``++``) must be one the composed
configuration has, and an unknown one is refused with the closest known keys:
``data.segment.length is not a setting; did you mean data.segment.length_seconds?``.
Hydra's own keys (``hydra.*``, ``hydra/launcher=...``) are left to Hydra, but for
one thing: a search (``hparams_search=resnet``, ``hydra/sweeper=optuna``) needs -m and
Hydra's Optuna sweeper, which Hydra would report missing as a config it cannot find.
"""

from __future__ import annotations

import difflib
import importlib.util
import itertools
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
# Flags after which the configuration is not conf/config.yaml: Hydra alone checks those runs.
OTHER_CONFIG = ("-cn", "-cp", "-cd", "--config-name", "--config-path", "--config-dir")


def check_overrides(args: list[str]) -> None:
    """Refuse an override that sets a key the configuration does not have.

    Args:
        args: the command line after the program (flags are passed over).

    Raises:
        ConfigError: naming the key and the closest known keys.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(a.split("=")[0] in OTHER_CONFIG for a in args):
        return
    overrides = [a for a in args if "=" in a or a[:1] == "~"]
    parser = OverridesParser.create()
    for arg in overrides:  # one at a time, to name the one Hydra cannot parse
        try:
            parser.parse_overrides([arg])
        except HydraException as err:
            raise ConfigError(
                f"{arg}: Hydra cannot parse it ({str(err).splitlines()[0]}); quote a value "
                "holding brackets, parentheses, spaces, commas or backslashes, e.g. "
                "\"data.label_regex='^(\\d+)_'\""
            ) from None
    parsed = parser.parse_overrides(overrides)
    groups = [o for o in parsed if _is_group(o.key_or_group)]
    multirun = any(a in ("-m", "--multirun") for a in args) or any(map(_sets_multirun, groups))
    sweep = next((o for o in parsed if o.is_sweep_override()), None)
    if sweep is not None and not multirun:
        raise ConfigError(
            f"{sweep.input_line}: a comma (or a range) makes it a sweep of several runs; add -m "
            f'to run one job per value, or quote the value: "{sweep.key_or_group}='
            f"'{sweep.input_line.split('=', 1)[1]}'\""
        )
    check_search(groups, args)
    keys = [
        o
        for o in parsed
        if not _is_group(o.key_or_group)
        and not o.is_delete()
        and o.key_or_group.split(".")[0] != "hydra"
    ]
    if not keys and not groups:
        return
    try:
        known = _known_keys(groups)
    except HydraException as err:  # a group choice that does not exist
        raise ConfigError(_one_line(err)) from None
    for o in keys:
        key = o.key_or_group
        if key in known:
            if o.is_add():
                raise ConfigError(f"+{key}: {key} is a setting already; set it without the +")
            continue
        close = suggest(key, known)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(
            f"{key} is not a setting{hint} (python -m pipeline.run --cfg job lists them all)"
        )


# The optional extra that installs Hydra's Optuna sweeper (pyproject.toml), and its module.
TUNE_EXTRA = 'pip install -e ".[tune]"'
OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper"
# Flags after which Hydra prints (the configuration, help) and runs nothing.
PRINT_ONLY = (
    "-c",
    "--cfg",
    "-i",
    "--info",
    "-h",
    "--help",
    "--hydra-help",
    "-sc",
    "--shell-completion",
)


def check_search(groups, args: list[str]) -> None:
    """Refuse a search (a ``conf/hparams_search`` preset, each of which sets Hydra's Optuna
    sweeper, or ``hydra/sweeper=optuna``) without the sweeper installed, or without -m
    unless the command only prints (``--cfg job``).

    Args:
        groups: the parsed config group overrides of the command line.
        args: the command line.

    Raises:
        ConfigError: naming the override and the fix.
    """
    for o in groups:
        key = o.key_or_group
        if key != "hparams_search" and not (key == "hydra/sweeper" and "optuna" in o.input_line):
            continue
        if not _installed(OPTUNA_SWEEPER):
            raise ConfigError(
                f"{o.input_line} needs Hydra's Optuna sweeper, which is not installed; install "
                f"the tune extra: {TUNE_EXTRA}"
            )
        if not any(a in ("-m", "--multirun", *PRINT_ONLY) for a in args):
            raise ConfigError(
                f"{o.input_line} is a search of many trials (one run each); add -m: "
                f"python -m pipeline.run -m {o.input_line}"
            )


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (hydra_plugins) is not there either
        return False


# Names other tools give these settings (scikit-learn's test_size, librosa's sr, ...).
ALIASES = {
    "test_size": "test_fraction",
    "val_size": "val_fraction",
    "valid_size": "val_fraction",
    "validation_fraction": "val_fraction",
    "hop": "hop_length",
    "hop_size": "hop_length",
    "win": "win_length",
    "win_size": "win_length",
    "window_size": "win_length",
    "nfft": "n_fft",
    "fft_size": "n_fft",
    "length": "length_seconds",
    "learning_rate": "lr",
    "batch": "batch_size",
    "epoch": "epochs",
    "sr": "sample_rate",
    "fs": "sample_rate",
    "samplerate": "sample_rate",
    "mels": "n_mels",
    "num_mels": "n_mels",
}


def suggest(key: str, known: set[str], *, n: int = 3) -> list[str]:
    """The known keys ``key`` most likely meant: a sibling it abbreviates or is another
    tool's name for, else the closest siblings, else the closest keys anywhere."""
    parent, _, leaf = key.rpartition(".")
    siblings = sorted(k for k in known if k.rpartition(".")[0] == parent and k != parent)
    leaves = {k.rpartition(".")[2]: k for k in siblings}
    if ALIASES.get(leaf) in leaves:
        return [leaves[ALIASES[leaf]]]
    prefixed = [k for name, k in leaves.items() if name.startswith(leaf)]
    return (
        prefixed[:n]
        or difflib.get_close_matches(key, siblings, n=n, cutoff=0.6)
        or difflib.get_close_matches(key, sorted(known), n=n, cutoff=0.6)
    )


def _one_line(err: Exception) -> str:
    """Hydra's "Could not find 'data/x'" with the options it lists after it, on one line."""
    lines = str(err).splitlines()
    listed = lines[: next((i for i, x in enumerate(lines) if x.startswith("Config search")), None)]
    options = [line.strip() for line in listed if line.startswith("\t")]
    first = lines[0].removeprefix("In 'config': ") if lines else str(err)
    return first + (f"; the choices are {', '.join(options)}" if options else "")


def _sets_multirun(o) -> bool:
    """Whether the group choice ``o`` is a preset that makes the run a multirun by itself
    (``hydra.mode: MULTIRUN``, as ``+experiment=degradation``), so it needs no -m."""
    if o.is_sweep_override() or "/" in o.key_or_group:
        return False
    path = CONF / o.key_or_group / f"{o.value()}.yaml"
    if not path.is_file():
        return False
    return OmegaConf.select(OmegaConf.load(path), "hydra.mode") == "MULTIRUN"


def _is_group(key: str) -> bool:
    """``data``, ``model`` (of ``model@resnet56``), ``hydra/launcher``: a config group."""
    return "." not in key and ("/" in key or (CONF / key).is_dir())


def _known_keys(groups) -> set[str]:
    """Every dotted key of the configuration composed with ``groups``' choices.

    A swept group (``features=stft,mel``) gives the keys of each of its choices.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    choices = [
        [_line(o, v) for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in groups
        if not o.key_or_group.startswith("hydra")
    ]
    known: set[str] = set()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            for overrides in itertools.product(*choices):
                cfg = compose("config", overrides=list(overrides))
                known |= _dotted(cfg, "")
    finally:
        GlobalHydra.instance().clear()
    return known


def _line(o, value: str) -> str:
    """One choice of a swept group override as an override of its own."""
    prefix = "+" if o.is_add() else "++" if o.is_force_add() else ""
    package = f"@{o.package}" if o.package else ""
    return f"{prefix}{o.key_or_group}{package}={value}"


def _dotted(node, prefix: str) -> set[str]:
    out = {prefix} if prefix else set()
    if isinstance(node, DictConfig):
        for key in node:
            value = node._get_node(key)
            if OmegaConf.is_missing(node, key) or not isinstance(value, DictConfig | ListConfig):
                out.add(f"{prefix}{key}")
            else:
                out |= _dotted(value, f"{prefix}{key}.")
    return {k.rstrip(".") for k in out}
