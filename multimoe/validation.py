"""Checks of user-given numbers, shared by every entry point that takes one.

Python compares NaN false against everything, so `threshold=float("nan")` passes `threshold < 0`
unnoticed and then decides nothing (or everything) silently. Every numeric option goes through
`check_number` before anything is read, built or modified.
"""

from __future__ import annotations

import math
import numbers


def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = 0,
    positive: bool = False,
    integer: bool = False,
    optional: bool = False,
):
    """`value` itself when it is a finite real number (an int when `integer`), at least `minimum`
    (above 0 when `positive`); otherwise a `ValueError` (`TypeError` for a non-number) naming
    the option. `None` passes when `optional`. Bools are refused: `True` is not the number 1."""
    if value is None and optional:
        return None
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}.")
    return value


__all__ = ["check_number"]
