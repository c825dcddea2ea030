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
    """A phase-fair readers-writer lock: calls read, edits write.

    An edit waiting holds new calls back, so a steady stream of calls cannot starve it; the calls
    held back go before the next edit, so a steady stream of edits cannot starve them either.
    Reading is re-entrant per thread (`generate` holds it around the forwards it makes). An edit
    from inside a call of the same thread would wait for itself, so it is refused. A call that
    waits on another thread's new call (a bounded queue drained by a thread that also calls the
    model) deadlocks once an edit is waiting: make such calls from one thread.
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._readers = 0
        self._readers_held = 0  # calls waiting for an edit; let in together when it is done
        self._releases = 0  # how many times held calls were let in
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
            self._enter_reading()
        self._depth.value = depth + 1
        try:
            yield
        finally:
            self._depth.value = depth
            if depth == 0:
                with self._condition:
                    self._readers -= 1
                    self._condition.notify_all()

    def _enter_reading(self) -> None:
        with self._condition:
            if not self._writing and not self._writers_waiting:
                self._readers += 1
                return
            self._readers_held += 1
            held_at = self._releases
            try:
                self._condition.wait_for(lambda: self._releases != held_at)  # the edit counted us in
            except BaseException:  # e.g. KeyboardInterrupt: leave no count behind, or edits wait forever
                if self._releases != held_at:
                    self._readers -= 1
                else:
                    self._readers_held -= 1
                self._condition.notify_all()
                raise

    @contextmanager
    def writing(self) -> Iterator[None]:
        if getattr(self._depth, "value", 0):
            raise RuntimeError(
                "Tenants cannot be edited from inside a forward or generate call of the same model (it would wait "
                "for itself); edit them before or after the call."
            )
        with self._condition:
            self._writers_waiting += 1
            try:
                self._condition.wait_for(lambda: not self._writing and not self._readers)
            except BaseException:  # e.g. KeyboardInterrupt: let in the calls this edit held back
                self._writers_waiting -= 1
                if not self._writing and not self._writers_waiting:
                    self._admit_held_calls()
                self._condition.notify_all()
                raise
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._admit_held_calls()  # before any other edit
                self._condition.notify_all()

    def _admit_held_calls(self) -> None:
        """Count the calls held back by edits as running, and wake them (under the condition)."""
        if self._readers_held:
            self._readers += self._readers_held
            self._readers_held = 0
            self._releases += 1


__all__ = ["TenantLock"]
