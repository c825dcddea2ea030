"""Edits of a model's tenants (add, remove, resize) against forwards running in other threads.

A forward reads the tenant set (names, their order, the pool and the maps) many times, and an
edit changes several of those at once: a forward that ran while `remove_tenant` renumbered the
pool crashed or read the wrong experts. `TenantLock` lets any number of calls run together, and an
edit wait until the calls running finish, holding new ones back meanwhile, so that every call
sees the tenant set whole, before or after an edit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class TenantLock:
    """A readers-writer lock: calls read, edits write.

    Reading is re-entrant per thread (`generate` holds it around the forwards it makes), and an
    edit waiting holds new calls back, so a steady stream of calls cannot starve it. An edit from
    inside a call of the same thread would wait for itself, so it is refused.
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._readers = 0
        self._writers_waiting = 0
        self._writing = False
        self._depth = threading.local()

    def __reduce__(self):
        # Copies and pickles of a model get a fresh lock: the state of this one is not theirs.
        return TenantLock, ()

    @contextmanager
    def reading(self) -> Iterator[None]:
        depth = getattr(self._depth, "value", 0)
        if depth == 0:
            with self._condition:
                self._condition.wait_for(lambda: not self._writing and not self._writers_waiting)
                self._readers += 1
        self._depth.value = depth + 1
        try:
            yield
        finally:
            self._depth.value = depth
            if depth == 0:
                with self._condition:
                    self._readers -= 1
                    self._condition.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        if getattr(self._depth, "value", 0):
            raise RuntimeError(
                "Tenants cannot be edited from inside a forward or generate call of the same model (it would wait "
                "for itself); edit them before or after the call."
            )
        with self._condition:
            self._writers_waiting += 1
            self._condition.wait_for(lambda: not self._writing and not self._readers)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


__all__ = ["TenantLock"]
