"""Request traces: Poisson arrivals per tenant (seeded), or JSON Lines files."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..validation import check_number


def check_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}.")
    if not value:
        raise ValueError(f"{name} must not be empty.")


def is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class Request:
    """One generation request: who asks, when (seconds from the trace start), and for what.

    Decoding is greedy at `temperature` 0 (the default), else sampled from the temperature-scaled
    distribution cut to its `top_p` nucleus, from a generator of the row's own seeded with `seed`
    (the same tokens whatever else is in the batch), or from torch's global one without a seed. A
    row stops after `max_new_tokens`, at its tenant's EOS unless `ignore_eos` (vLLM's name; traces
    for benchmarks set it, so that every request asks for the same work), or once its text
    contains one of the `stop` strings (the text is cut before it, as OpenAI's API does)."""

    request_id: int
    tenant: str
    arrival_s: float
    prompt: str
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    prompt_ids: tuple[int, ...] | None = None  # the prompt already tokenized (a rendered chat template)

    def __post_init__(self):
        """Refused here, where every trace (and trace file) passes, what a replay would crash on
        midway or answer wrongly: an empty prompt leaves nothing to predict from, and prefill
        always yields a first token, so `max_new_tokens` below 1 would still get one."""
        check_number("request_id", self.request_id, integer=True, minimum=None)
        request = f"request {self.request_id}"
        check_text(f"tenant of {request}", self.tenant)
        check_number(f"arrival_s of {request}", self.arrival_s)
        check_text(f"prompt of {request}", self.prompt)
        check_number(f"max_new_tokens of {request}", self.max_new_tokens, integer=True, positive=True)
        check_number(f"temperature of {request}", self.temperature)
        check_number(f"top_p of {request}", self.top_p, positive=True)
        if self.top_p > 1:
            raise ValueError(f"top_p of {request} must be at most 1, got {self.top_p!r}.")
        check_number(f"seed of {request}", self.seed, integer=True, optional=True)
        if isinstance(self.stop, str) or not all(isinstance(text, str) and text for text in self.stop):
            raise ValueError(f"stop of {request} must be a list of non-empty strings, got {self.stop!r}.")
        object.__setattr__(self, "stop", tuple(self.stop))  # a JSON list becomes a tuple: the request stays hashable
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos of {request} must be a bool, got {self.ignore_eos!r}.")
        if self.prompt_ids is not None:
            if isinstance(self.prompt_ids, (str, bytes)) or not self.prompt_ids or not all(
                is_token(token) for token in self.prompt_ids
            ):
                raise ValueError(f"prompt_ids of {request} must be a non-empty list of token ids, got {self.prompt_ids!r:.80}.")
            object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))


def poisson_trace(
    rates: Mapping[str, float],
    *,
    num_requests: int,
    prompts: Sequence[str],
    max_new_tokens: int,
    seed: int = 0,
) -> list[Request]:
    """`num_requests` requests merged from independent Poisson processes, one per tenant, with
    `rates[tenant]` requests per second; prompts are drawn from `prompts`."""
    check_number("num_requests", num_requests, integer=True, positive=True)
    if not rates:
        raise ValueError("Give at least one tenant's arrival rate.")
    for tenant, rate in rates.items():
        check_number(f"arrival rate of tenant {tenant!r}", rate, positive=True)
    if not prompts:
        raise ValueError("Give at least one prompt.")
    generator = random.Random(seed)
    total_rate = sum(rates.values())
    tenants, weights = list(rates), [rates[tenant] / total_rate for tenant in rates]
    clock, requests = 0.0, []
    for request_id in range(num_requests):
        # A merged Poisson process: exponential gaps at the total rate, tenant drawn by its share.
        clock += generator.expovariate(total_rate)
        tenant = generator.choices(tenants, weights)[0]
        prompt = generator.choice(list(prompts))
        requests.append(Request(request_id, tenant, clock, prompt, max_new_tokens, ignore_eos=True))
    return requests


def write_jsonl(requests: Sequence[Request], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(asdict(request)) + "\n" for request in requests))


def read_jsonl(path: str | Path) -> list[Request]:
    """Requests from a JSON Lines file, one object per line with the `Request` fields."""
    requests = []
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            requests.append(Request(**json.loads(line)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}:{line_number}: not a request ({error}).") from error
    return sorted(requests, key=lambda request: request.arrival_s)


__all__ = ["Request", "poisson_trace", "read_jsonl", "write_jsonl"]
