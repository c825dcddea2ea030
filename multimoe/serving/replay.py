"""Replaying a request trace through a scheduler, on a virtual clock driven by real compute.

Arrivals come from the trace; every prefill, decode step and weight copy is really run and its
measured duration advances the clock. When the server is idle the clock jumps to the next
arrival, so a trace spanning minutes replays in the time its compute takes.

Schedulers:
- `fcfs`: one request at a time in arrival order (the paper's server).
- `static`: when idle, take up to `max_batch_size` waiting requests and run them to completion.
- `continuous`: every decode step, admit waiting requests up to `max_batch_size` and retire
  finished ones.
A backend that cannot mix tenants in a batch only batches requests of the head request's tenant.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..memory import parameter_bytes
from ..validation import check_number
from .backends import Backend, SingleModelBackend
from .engine import Engine, RunningBatch
from .trace import Request

SCHEDULERS = ("fcfs", "static", "continuous")


@dataclass(frozen=True)
class RequestRecord:
    """When a request was served (seconds on the trace clock) and the tokens it got."""

    request: Request
    start_s: float
    first_token_s: float
    finish_s: float
    tokens: tuple[int, ...]

    @property
    def queue_wait_s(self) -> float:
        return self.start_s - self.request.arrival_s

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.request.arrival_s

    @property
    def turnaround_s(self) -> float:
        return self.finish_s - self.request.arrival_s

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / max(self.finish_s - self.start_s, 1e-9)


@dataclass(frozen=True)
class ReplaySummary:
    system: str
    scheduler: str
    requests: int
    mean_turnaround_s: float
    mean_ttft_s: float
    mean_queue_wait_s: float
    tokens_per_s: float  # all generated tokens over the span from first arrival to last finish
    memory_bytes: int

    @classmethod
    def of(cls, system: str, scheduler: str, records: Sequence[RequestRecord], memory_bytes: int) -> ReplaySummary:
        span = max(r.finish_s for r in records) - min(r.request.arrival_s for r in records)
        return cls(
            system=system,
            scheduler=scheduler,
            requests=len(records),
            mean_turnaround_s=statistics.mean(r.turnaround_s for r in records),
            mean_ttft_s=statistics.mean(r.ttft_s for r in records),
            mean_queue_wait_s=statistics.mean(r.queue_wait_s for r in records),
            tokens_per_s=sum(len(r.tokens) for r in records) / span,
            memory_bytes=memory_bytes,
        )


def check_trace(trace: Sequence[Request], tenants: Collection[str] | None) -> None:
    """Refuse, before anything runs, a trace that a replay would crash on midway or summarize
    wrongly: no requests, a request id given twice (records are matched by id), or a tenant that
    the system does not serve (`tenants`; `None` serves any)."""
    if not trace:
        raise ValueError("The trace has no requests.")
    counts = Counter(request.request_id for request in trace)
    repeated = sorted(request_id for request_id, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(f"Request ids must be unique in a trace; given more than once: {repeated}.")
    unknown = set() if tenants is None else {request.tenant for request in trace} - set(tenants)
    if unknown:
        raise ValueError(f"The trace asks for tenants {sorted(unknown)}, which this system does not serve; "
                         f"it serves {sorted(tenants)}.")


class Replay:
    """One server: a backend, a scheduler and a clock. `time_scale` stretches measured compute
    (a partition that owns 1/N of the machine runs each step N times slower)."""

    def __init__(self, backend: Backend, tokenizer, *, scheduler: str, max_batch_size: int = 8, time_scale: float = 1.0):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"Unknown scheduler {scheduler!r}; choose one of {SCHEDULERS}.")
        check_number("max_batch_size", max_batch_size, integer=True, positive=True)
        check_number("time_scale", time_scale, positive=True)
        self.backend = backend
        self.engine = Engine(backend.model, tokenizer, backend.prepare)
        self.scheduler = scheduler
        self.max_batch_size = 1 if scheduler == "fcfs" else max_batch_size
        self.time_scale = time_scale
        self.clock = 0.0

    def timed(self, function, *args):
        device = self.backend.model.device
        start = time.perf_counter()
        result = function(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.clock += (time.perf_counter() - start) * self.time_scale
        return result

    def admit(self, waiting: list[Request], running: RunningBatch | None) -> list[Request]:
        """Requests to start now, in arrival order, respecting batch size and tenant mixing."""
        room = self.max_batch_size - (len(running.requests) if running else 0)
        if room <= 0 or not waiting:
            return []
        tenant = running.requests[0].tenant if running else waiting[0].tenant
        eligible = [r for r in waiting if self.backend.mixes_tenants or r.tenant == tenant]
        return eligible[:room]

    def run(self, trace: Sequence[Request]) -> list[RequestRecord]:
        check_trace(trace, self.backend.tenants)
        pending = sorted(trace, key=lambda request: request.arrival_s)
        waiting: list[Request] = []
        running: RunningBatch | None = None
        started: dict[int, tuple[float, float]] = {}
        records: list[RequestRecord] = []
        config = self.backend.model.config
        while pending or waiting or running:
            while pending and pending[0].arrival_s <= self.clock:
                waiting.append(pending.pop(0))
            if running is None and not waiting:
                self.clock = pending[0].arrival_s
                continue
            if running is None or self.scheduler == "continuous":
                admitted = self.admit(waiting, running)
                if admitted:
                    for request in admitted:
                        waiting.remove(request)
                    start = self.clock
                    fresh = self.timed(self.engine.prefill, admitted)
                    for request in admitted:
                        started[request.request_id] = (start, self.clock)
                    running = fresh if running is None else running.merge(fresh, config)
            done = running.finished_rows()
            if len(done) < len(running.requests):
                running = self.timed(self.engine.decode, running)
                done = running.finished_rows()
            for row in done:
                request = running.requests[row]
                start, first = started.pop(request.request_id)
                records.append(RequestRecord(request, start, first, self.clock, tuple(running.tokens[row])))
            if done:
                running = running.keep([row for row in range(len(running.requests)) if row not in done], config)
        return sorted(records, key=lambda record: record.request.request_id)


WARM_UP_REQUESTS = 2


def warmed_up_run(backend: Backend, tokenizer, trace: Sequence[Request], **options) -> list[RequestRecord]:
    """Run `trace` after a throwaway run of its first requests (first calls allocate and pick kernels)."""
    check_trace(trace, backend.tenants)  # the whole trace, not only the warm-up's part
    Replay(backend, tokenizer, **options).run(trace[:WARM_UP_REQUESTS])
    return Replay(backend, tokenizer, **options).run(trace)


def replay(backend: Backend, trace: Sequence[Request], tokenizer, *, scheduler: str, max_batch_size: int = 8) -> ReplaySummary:
    records = warmed_up_run(backend, tokenizer, trace, scheduler=scheduler, max_batch_size=max_batch_size)
    return ReplaySummary.of(backend.name, scheduler, records, backend.memory_bytes())


def replay_partitioned(
    models: Mapping[str, torch.nn.Module], trace: Sequence[Request], tokenizer, *, scheduler: str, max_batch_size: int = 8
) -> ReplaySummary:
    """The MIG analogue: one model per tenant, each on an even share of the machine.

    With T CPU threads and N partitions, a partition gets max(1, T // N) threads; when N > T it
    also gets only a 1/N time share of a core, modelled by stretching its measured compute by N / T.
    On CUDA, where partitions cannot be carved here, each partition's compute is stretched by N.
    """
    check_trace(trace, models)  # a tenant without a partition would be dropped from the summary
    device = next(iter(models.values())).device
    threads = torch.get_num_threads()
    partitions = len(models)
    share_threads = max(1, threads // partitions)
    time_scale = partitions if device.type == "cuda" else max(1.0, partitions / threads)
    records = []
    torch.set_num_threads(share_threads)
    try:
        for tenant, model in models.items():
            own_trace = [request for request in trace if request.tenant == tenant]
            if own_trace:
                records += warmed_up_run(SingleModelBackend(model), tokenizer, own_trace, scheduler=scheduler,
                                         max_batch_size=max_batch_size, time_scale=time_scale)
    finally:
        torch.set_num_threads(threads)
    memory = parameter_bytes(list(models.values()))
    return ReplaySummary.of("static partition (MIG-like)", scheduler, records, memory)


__all__ = ["Replay", "ReplaySummary", "RequestRecord", "SCHEDULERS", "replay", "replay_partitioned"]
