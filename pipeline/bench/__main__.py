"""``python -m pipeline.bench <name> [args]``: run one benchmark module of this package."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import pipeline.bench


def _names() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(pipeline.bench.__path__) if not m.name.startswith("_")
    )


def main(argv: list[str]) -> int:
    names = _names()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m pipeline.bench {{{','.join(names)}}} [--help]")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"unknown benchmark {name!r}; choose one of {names}", file=sys.stderr)
        return 2
    return importlib.import_module(f"pipeline.bench.{name}").main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
