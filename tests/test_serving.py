"""Trace replay: every scheduler and system serves each request exactly what its tenant generates."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from multimoe.serving import (
    Replay,
    Request,
    SharedPoolBackend,
    SingleModelBackend,
    partial_reconfiguration,
    poisson_trace,
    read_jsonl,
    replay,
    replay_partitioned,
    whole_model_swap,
    write_jsonl,
)
from multimoe.serving.engine import Engine

PROMPTS = ["hello there", "hi", "what is 2+2?", "code: x=1", "ok"]
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def trace():
    rates = {"base": 40.0, "chat": 30.0, "code": 20.0, "tied": 10.0}
    return poisson_trace(rates, num_requests=14, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, seed=3)


@pytest.fixture(scope="module")
def expected(tenants, tokenizer, trace):
    """What each request's tenant model generates for it alone, greedily, for a fixed length (the
    replay treats EOS as an ordinary token, like the paper's fixed 25-token workload)."""
    answers = {}
    for request in trace:
        inputs = tokenizer(request.prompt, return_tensors="pt")
        output = tenants[request.tenant].generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        answers[request.request_id] = tuple(output[0, inputs["input_ids"].shape[1] :].tolist())
    return answers


def test_poisson_trace_is_seeded_and_ordered(trace):
    again = poisson_trace({"base": 40.0, "chat": 30.0, "code": 20.0, "tied": 10.0}, num_requests=14,
                          prompts=PROMPTS, max_new_tokens=NEW_TOKENS, seed=3)
    assert again == trace
    arrivals = [request.arrival_s for request in trace]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert {request.tenant for request in trace} == {"base", "chat", "code", "tied"}
    with pytest.raises(ValueError, match="arrival rate of tenant 'a' must be positive"):
        poisson_trace({"a": 0.0}, num_requests=1, prompts=PROMPTS, max_new_tokens=1)
    with pytest.raises(ValueError, match="arrival rate of tenant 'a' must be a finite number, got nan"):
        poisson_trace({"a": float("nan")}, num_requests=1, prompts=PROMPTS, max_new_tokens=1)
    with pytest.raises(ValueError, match="num_requests must be positive, got 0"):
        poisson_trace({"a": 1.0}, num_requests=0, prompts=PROMPTS, max_new_tokens=1)


def test_jsonl_round_trip(trace, tmp_path):
    write_jsonl(trace, tmp_path / "trace.jsonl")
    assert read_jsonl(tmp_path / "trace.jsonl") == trace
    (tmp_path / "bad.jsonl").write_text('{"tenant": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a request"):
        read_jsonl(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("mix_tenants", [True, False])
@pytest.mark.parametrize("scheduler", ["fcfs", "static", "continuous"])
def test_shared_pool_serves_every_request_its_tenants_tokens(multi, tokenizer, trace, expected, scheduler, mix_tenants):
    backend = SharedPoolBackend(multi, mix_tenants=mix_tenants)
    records = Replay(backend, tokenizer, scheduler=scheduler, max_batch_size=4).run(trace)
    assert [r.request.request_id for r in records] == [r.request_id for r in trace]
    for record in records:
        assert record.tokens == expected[record.request.request_id], (scheduler, record.request)
        assert record.request.arrival_s <= record.start_s < record.first_token_s <= record.finish_s
        assert record.ttft_s <= record.turnaround_s


def test_a_right_padding_tokenizer_gets_the_same_tokens(multi, tokenizer, trace, expected):
    right_padding = copy.deepcopy(tokenizer)
    right_padding.padding_side = "right"
    # All arriving at once, prompts of different lengths are prefilled together, so padding matters.
    at_once = [dataclasses.replace(request, arrival_s=0.0) for request in trace]
    records = Replay(SharedPoolBackend(multi), right_padding, scheduler="static", max_batch_size=4).run(at_once)
    assert {record.request.request_id: record.tokens for record in records} == expected


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        ("prompt", "", ValueError, "prompt of request 7 must not be empty"),
        ("prompt", None, TypeError, "prompt of request 7 must be a string"),
        ("tenant", "", ValueError, "tenant of request 7 must not be empty"),
        ("max_new_tokens", 0, ValueError, "max_new_tokens of request 7 must be positive, got 0"),
        ("max_new_tokens", -3, ValueError, "max_new_tokens of request 7 must be positive, got -3"),
        ("max_new_tokens", 2.5, TypeError, "max_new_tokens of request 7 must be an int"),
        ("arrival_s", float("nan"), ValueError, "arrival_s of request 7 must be a finite number, got nan"),
        ("arrival_s", 10**400, ValueError, "arrival_s of request 7 must be a finite number, got 1000"),  # too big for a float
        ("arrival_s", -1.0, ValueError, "arrival_s of request 7 must be at least 0, got -1.0"),
        ("request_id", "7", TypeError, "request_id must be an int, got str '7'"),
    ],
)
def test_request_refuses_what_a_replay_would_crash_on_or_answer(field, value, error, message):
    fields = {"request_id": 7, "tenant": "base", "arrival_s": 0.5, "prompt": "hi", "max_new_tokens": 2}
    with pytest.raises(error, match=message):
        Request(**{**fields, field: value})


@pytest.fixture
def spied_backend(multi):
    """The shared pool, recording every batch it prepares: a refused trace must prepare none."""
    backend = SharedPoolBackend(multi)
    backend.prepared = []
    backend.prepare = lambda row_tenants: backend.prepared.append(row_tenants) or {"tenant_names": list(row_tenants)}
    return backend


def test_replay_refuses_a_bad_trace_before_running_any_of_it(spied_backend, tenants, tokenizer, trace):
    repeated = [*trace, dataclasses.replace(trace[-1], request_id=trace[3].request_id)]
    unknown = [*trace, Request(99, "nobody", trace[-1].arrival_s, "hi", 1)]
    for bad, message in [
        ([], "The trace has no requests"),
        (repeated, rf"given more than once: \[{trace[3].request_id}\]"),
        (unknown, r"tenants \['nobody'\], which this system does not serve"),
    ]:
        with pytest.raises(ValueError, match=message):
            replay(spied_backend, bad, tokenizer, scheduler="continuous")
        with pytest.raises(ValueError, match=message):
            Replay(spied_backend, tokenizer, scheduler="continuous").run(bad)
    assert spied_backend.prepared == []
    # A partition per tenant used to drop the requests of a tenant it has no partition for.
    with pytest.raises(ValueError, match=r"tenants \['chat', 'code', 'tied'\], which this system does not serve"):
        replay_partitioned({"base": tenants["base"]}, trace, tokenizer, scheduler="fcfs")


@pytest.mark.parametrize(
    "option, value, error, message",
    [
        ("max_batch_size", 0, ValueError, "max_batch_size must be positive, got 0"),
        ("max_batch_size", 2.0, TypeError, "max_batch_size must be an int"),
        ("time_scale", float("nan"), ValueError, "time_scale must be a finite number"),
        ("time_scale", 0.0, ValueError, "time_scale must be positive"),
    ],
)
def test_replay_refuses_bad_options(multi, tokenizer, option, value, error, message):
    with pytest.raises(error, match=message):
        Replay(SharedPoolBackend(multi), tokenizer, scheduler="static", **{option: value})


def test_engine_refuses_an_empty_prefill(multi, tokenizer):
    with pytest.raises(ValueError, match="prefill needs at least one request"):
        Engine(multi, tokenizer, SharedPoolBackend(multi).prepare).prefill([])


def test_engine_keeps_rows_grouped_by_tenant(multi, tokenizer, trace, expected):
    engine = Engine(multi, tokenizer, SharedPoolBackend(multi).prepare)
    first, second = trace[2:6], trace[6:11]  # base base chat base; chat base code code tied
    batch = engine.prefill(first)
    assert batch.tenants == ["base"] * 3 + ["chat"]
    batch = engine.decode(batch).merge(engine.prefill(second), multi.config)
    assert batch.tenants == ["base"] * 4 + ["chat"] * 2 + ["code"] * 2 + ["tied"]
    for _ in range(NEW_TOKENS - 2):
        batch = engine.decode(batch)
    for request, tokens in zip(batch.requests, batch.tokens):
        assert len(tokens) == NEW_TOKENS - (request in second)
        assert tuple(tokens) == expected[request.request_id][: len(tokens)], request


@pytest.mark.parametrize("make_backend", [whole_model_swap, "partial"])
def test_copy_in_baselines_serve_the_right_tenant_after_switches(multi, tenants, tokenizer, trace, expected,
                                                                 make_backend):
    backend = partial_reconfiguration(multi) if make_backend == "partial" else make_backend(tenants)
    records = Replay(backend, tokenizer, scheduler="continuous", max_batch_size=4).run(trace)
    assert backend.switches > 0
    for record in records:
        assert record.tokens == expected[record.request.request_id], record.request


def test_static_partition_serves_each_tenant_from_its_own_model(tenants, tokenizer, trace, expected):
    summary = replay_partitioned(tenants, trace, tokenizer, scheduler="fcfs")
    assert summary.requests == len(trace)
    assert summary.memory_bytes == sum(sum(p.numel() * 4 for p in m.parameters()) for m in tenants.values())


def test_single_model_upper_bound_ignores_tenants(tenants, tokenizer, trace):
    records = Replay(SingleModelBackend(tenants["base"]), tokenizer, scheduler="continuous").run(trace)
    assert len(records) == len(trace)
    assert all(len(record.tokens) == NEW_TOKENS for record in records)


def test_unknown_scheduler_is_refused(multi, tokenizer):
    with pytest.raises(ValueError, match="Unknown scheduler 'lifo'"):
        Replay(SharedPoolBackend(multi), tokenizer, scheduler="lifo")


def test_bench_command_runs_and_rewrites_its_docs_section(tmp_path):
    from multimoe.serving.bench import DOCS_BEGIN, DOCS_END, main

    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\nkept\n\n{DOCS_BEGIN}\nold\n{DOCS_END}\n")
    main(["--layers", "1", "--hidden", "32", "--intermediate", "48", "--requests", "4", "--rates", "50",
          "--tenants", "2", "--new-tokens", "2", "--ratio-shapes", "--write-docs", str(docs)])
    text = docs.read_text()
    assert "kept" in text and "old" not in text and text.count(DOCS_BEGIN) == 1
    assert "| H=32, I=48 | lossless (tenants' own experts) |" in text and "single-model bound" in text
    assert "| 2 | 50 | multimoe [continuous] |" in text and "static partition (MIG-like)" in text
    for image in ("serving_turnaround.png", "serving_ttft.png"):
        assert (tmp_path / "img" / image).read_bytes()[:4] == b"\x89PNG"


def test_bench_ratio_only_runs_just_the_mixed_batch_part(capsys):
    from multimoe.serving.bench import main

    main(["--layers", "1", "--hidden", "32", "--intermediate", "48", "--ratio-only", "--ratio-shapes", "64x112"])
    out = capsys.readouterr().out
    for shape in ("H=32, I=48", "H=64, I=112"):
        assert f"| {shape} | consolidated to one model's experts | 8 |" in out
    assert "replayed" not in out
    with pytest.raises(SystemExit):
        main(["--ratio-only", "--write-docs"])
