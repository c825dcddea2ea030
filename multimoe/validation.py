"""Checks of user-given numbers, shared by every entry point that takes one.

Python compares NaN false against everything, so `threshold=float("nan")` passes `threshold < 0`
unnoticed and then decides nothing (or everything) silently. Every numeric option goes through
`check_number` before anything is read, built or modified.
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable


def is_finite(value: numbers.Real) -> bool:
    """Neither NaN nor infinite, nor an int too large for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = 0,
    positive: bool = False,
    integer: bool = False,
    optional: bool = False,
    unbounded: bool = False,
):
    """`value` itself when it is a finite real number (an int when `integer`), at least `minimum`
    (above 0 when `positive`); otherwise a `ValueError` (`TypeError` for a non-number) naming
    the option. `None` passes when `optional`, `math.inf` when `unbounded` (a limit that does not
    limit). Bools are refused: `True` is not the number 1."""
    if (value is None and optional) or (unbounded and value == math.inf and not isinstance(value, bool)):
        return value
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}.")
    if not is_finite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r:.40}.")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}.")
    return value


def number_argument(name: str, *, integer: bool = False, **limits) -> Callable[[str], int | float]:
    """An argparse `type` refusing, with exit status 2 before any work, what `check_number` refuses
    (NaN, infinities, out of range, a fraction for a count), so the flag behaves as the API does."""

    def parse(text: str) -> int | float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = text  # not a number: check_number says what it should be
        try:
            return check_number(name, value, integer=integer, **limits)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


__all__ = ["check_number", "is_finite", "number_argument"]
