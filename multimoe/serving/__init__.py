"""Serving: request traces, the compared systems, and trace replay through schedulers.

    trace.py     Request, poisson_trace, read_jsonl / write_jsonl
    engine.py    prefill / decode of a running batch whose rows join and leave, each row greedy or
                 sampled, stopping at its length, its tenant's EOS or a stop string
    backends.py  multimoe's shared pool and the baselines (single model, whole-model swap,
                 partial reconfiguration by copying)
    replay.py    fcfs / static / continuous schedulers on a virtual clock; the MIG-like partition
    bench.py     `python -m multimoe.serving.bench`
"""

from .backends import Backend, SharedPoolBackend, SingleModelBackend, partial_reconfiguration, whole_model_swap
from .replay import SCHEDULERS, Replay, ReplaySummary, RequestRecord, replay, replay_partitioned
from .trace import Request, poisson_trace, read_jsonl, write_jsonl

__all__ = [
    "Backend",
    "Replay",
    "ReplaySummary",
    "Request",
    "RequestRecord",
    "SCHEDULERS",
    "SharedPoolBackend",
    "SingleModelBackend",
    "partial_reconfiguration",
    "poisson_trace",
    "read_jsonl",
    "replay",
    "replay_partitioned",
    "whole_model_swap",
    "write_jsonl",
]
