"""The live scheduler behind `multimoe serve`: one running batch for all tenants, in a thread.

Requests for any tenant join the same batch between decode steps (continuous batching of
mixed-tenant rows, as in `replay.py`, but on a real clock). Admission is fair across tenants: a
free row goes to the tenant next in a round-robin over those with waiting requests, oldest request
first within a tenant, so a flood for one tenant delays another's requests by at most one
admission round, never by the flood's length. A cancelled request (its client left) leaves the
batch at the next step boundary. Every model call runs in this thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .engine import Engine, RunningBatch
from .metrics import ServingMetrics
from .trace import Request

# How long the loop sleeps when there is nothing to do; a submit wakes it at once.
IDLE_WAIT_S = 0.05


@dataclass
class Job:
    """A request in the server: `emit(text_delta, finish_reason)` is called from the loop thread
    for every new piece of text (finish_reason None) and once at the end (the rest of the text,
    and "stop", "length", "abort" at shutdown, or "error" with `error` set)."""

    request: Request
    emit: Callable[[str, str | None], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    error: str | None = None  # why the engine failed this request (finish reason "error")
    submitted_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    sent: int = 0  # characters of the text already emitted
    tokens: int = 0


class ServingLoop:
    """Continuous mixed-tenant batching with fair admission, run by `start()` in a daemon thread."""

    def __init__(self, engine: Engine, *, max_batch_size: int, metrics: ServingMetrics):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.metrics = metrics
        self.waiting: dict[str, deque[Job]] = {}
        self.turn: deque[str] = deque()  # tenants in round-robin order
        self.running: RunningBatch | None = None
        self.jobs: list[Job] = []  # aligned with the running batch's rows
        self.wake = threading.Condition()
        self.stopping = False  # no new requests; the admitted ones finish
        self.aborting = False  # the rest are aborted
        self.thread = threading.Thread(target=self.run, name="multimoe-serving", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.wake:
            if self.stopping:
                raise RuntimeError("The server is shutting down.")
            tenant = job.request.tenant
            if tenant not in self.waiting:
                self.waiting[tenant] = deque()
                self.turn.append(tenant)
            self.waiting[tenant].append(job)
            self.metrics.queued(tenant, len(self.waiting[tenant]))
            self.wake.notify()

    def stop(self, timeout_s: float) -> None:
        """Refuse new requests, let the running and waiting ones finish within `timeout_s`, then
        abort what is left (each gets its text so far and finish reason "abort")."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout_s)
        with self.wake:
            self.aborting = True
            self.wake.notify()
        self.thread.join()

    def admit(self) -> list[Job]:
        """Up to the free rows, one request per tenant in turn (see the module docstring)."""
        chosen: list[Job] = []
        room = self.max_batch_size - len(self.jobs)
        with self.wake:
            while room > len(chosen) and self.turn:
                tenant = self.turn.popleft()
                queue = self.waiting[tenant]
                job = queue.popleft()
                self.metrics.queued(tenant, len(queue))
                if queue:
                    self.turn.append(tenant)
                else:
                    del self.waiting[tenant]
                if job.cancelled.is_set():  # its client left while it waited
                    self.metrics.finished(job, time.perf_counter(), "cancelled")
                else:
                    chosen.append(job)
        return chosen

    def run(self) -> None:
        while True:
            with self.wake:
                idle = not self.jobs and not self.turn
                if idle and self.stopping:
                    return
                if idle:
                    self.wake.wait(IDLE_WAIT_S)
                    continue
            if self.aborting:
                return self.abort_all()
            try:
                self.step()
            except Exception as error:  # the batch's state is unknown: answer its rows, keep serving
                self.fail(self.jobs, error)
                self.running, self.jobs = None, []
                self.metrics.running(self.jobs)

    def fail(self, jobs: list[Job], error: Exception) -> None:
        now = time.perf_counter()
        for job in jobs:
            job.error = f"{type(error).__name__}: {error}"
            job.emit("", "error")
            self.metrics.finished(job, now, "error")

    def step(self) -> None:
        """Admit, prefill the newcomers and join them to the batch, or decode one step; then send
        every row its new text and drop the rows that finished or whose client left. A prefill
        that fails fails its own requests only; the running batch goes on."""
        admitted = self.admit()
        if admitted:
            try:
                fresh = self.engine.prefill([job.request for job in admitted])
            except Exception as error:
                return self.fail(admitted, error)
            jobs = {id(job.request): job for job in self.jobs + admitted}
            self.running = fresh if self.running is None else self.running.merge(fresh, self.engine.model.config)
            self.jobs = [jobs[id(request)] for request in self.running.requests]  # in the batch's (tenant) order
        elif self.running is not None:
            self.running = self.engine.decode(self.running)
        else:
            return
        self.publish()

    def publish(self) -> None:
        now = time.perf_counter()
        keep = []
        for row, job in enumerate(self.jobs):
            reason = self.running.finish_reasons[row]
            if job.cancelled.is_set():
                self.metrics.finished(job, now, "cancelled")
                continue
            if job.first_token_s is None:
                job.first_token_s = now
                self.metrics.first_token(job)
            job.tokens = len(self.running.tokens[row])
            text = self.engine.text(self.running, row)
            if reason is None:
                # Hold back an unfinished UTF-8 sequence, then what a stop string could still claim.
                hold = max((len(stop) - 1 for stop in job.request.stop), default=0)
                visible = text.rstrip("\ufffd")
                ready = visible[: max(job.sent, len(visible) - hold)]
                if len(ready) > job.sent:
                    job.emit(ready[job.sent :], None)
                    job.sent = len(ready)
                keep.append(row)
            else:
                job.emit(text[job.sent :], reason)
                self.metrics.finished(job, now, reason)
        if len(keep) < len(self.jobs):
            self.running = self.running.keep(keep, self.engine.model.config)
            self.jobs = [self.jobs[row] for row in keep]
        self.metrics.running(self.jobs)

    def abort_all(self) -> None:
        now = time.perf_counter()
        for job in self.jobs:
            job.emit("", "abort")
            self.metrics.finished(job, now, "abort")
        with self.wake:
            for queue in self.waiting.values():
                for job in queue:
                    job.emit("", "abort")
                    self.metrics.finished(job, now, "abort")
            self.waiting.clear()
            self.turn.clear()
        self.running, self.jobs = None, []
        self.metrics.running(self.jobs)


__all__ = ["Job", "ServingLoop"]
