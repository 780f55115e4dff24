"""Type predicates for values from the configuration or a bundle.

Hydra and JSON give ``true`` where a count is expected and strings where numbers are,
and ``bool`` is an ``int`` in Python: every check of a count or a number goes through
these, so ``True`` is never taken for 1.
"""

from __future__ import annotations


def is_number(value: object) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_whole(value: object, *, minimum: int = 0) -> bool:
    """An int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
