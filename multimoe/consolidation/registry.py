"""Named, registered units (similarity metrics, groupings, merge rules): adding one is one
decorated function in its module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

Unit = TypeVar("Unit", bound=Callable)


class Registry(dict, Generic[Unit]):
    """`name -> function`, plus which names need calibration data."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.needs_calibration: set[str] = set()

    def register(self, name: str, *, needs_calibration: bool = False) -> Callable[[Unit], Unit]:
        def add(function: Unit) -> Unit:
            self[name] = function
            if needs_calibration:
                self.needs_calibration.add(name)
            return function

        return add

    def lookup(self, name: str) -> Unit:
        if name not in self:
            raise ValueError(f"Unknown {self.kind} {name!r}; choose one of {sorted(self)}.")
        return self[name]


__all__ = ["Registry"]
