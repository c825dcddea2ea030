"""Per-tenant quality-of-service metrics of `multimoe serve`, in Prometheus' format (`/metrics`).

Each server has a registry of its own (two servers in one process, as in the tests, do not mix
their figures). Per tenant: requests waiting and running, time to first token, turnaround, decode
speed per request, tokens generated and requests finished by reason; `rate()` over the token
counter gives a tenant's tokens/s.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: a tiny CPU testbed answers in milliseconds, a large model on a loaded GPU in tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SPEED_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class ServingMetrics:
    def __init__(self, tenants: list[str]):
        self.tenants = list(tenants)
        self.registry = CollectorRegistry()
        labels = ["tenant"]
        self.queue_length = Gauge("multimoe_queue_length", "Requests waiting for a batch row", labels, registry=self.registry)
        self.running_requests = Gauge("multimoe_running_requests", "Requests in the running batch", labels,
                                      registry=self.registry)
        self.ttft = Histogram("multimoe_time_to_first_token_seconds", "From arrival to the first token", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.turnaround = Histogram("multimoe_turnaround_seconds", "From arrival to the last token", labels,
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.speed = Histogram("multimoe_request_tokens_per_second", "A request's tokens over its turnaround", labels,
                               buckets=SPEED_BUCKETS, registry=self.registry)
        self.tokens = Counter("multimoe_generated_tokens", "Tokens generated", labels, registry=self.registry)
        self.requests = Counter("multimoe_requests", "Requests finished, by finish reason", ["tenant", "reason"],
                                registry=self.registry)
        for tenant in tenants:  # every tenant shows, at 0, before its first request
            self.queue_length.labels(tenant).set(0)
            self.running_requests.labels(tenant).set(0)

    def queued(self, tenant: str, waiting: int) -> None:
        self.queue_length.labels(tenant).set(waiting)

    def first_token(self, job) -> None:
        self.ttft.labels(job.request.tenant).observe(job.first_token_s - job.submitted_s)

    def finished(self, job, now: float, reason: str) -> None:
        tenant = job.request.tenant
        self.requests.labels(tenant, reason).inc()
        self.tokens.labels(tenant).inc(job.tokens)
        if reason in ("stop", "length"):
            seconds = now - job.submitted_s
            self.turnaround.labels(tenant).observe(seconds)
            self.speed.labels(tenant).observe(job.tokens / max(seconds, 1e-9))

    def running(self, jobs) -> None:
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job.request.tenant] = counts.get(job.request.tenant, 0) + 1
        for tenant in self.tenants:
            self.running_requests.labels(tenant).set(counts.get(tenant, 0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServingMetrics"]
