"""The engine's per-row decoding: greedy or sampled (temperature, top_p, seed), stop strings, and
each tenant's own EOS, in mixed batches."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from multimoe.serving import Request, SharedPoolBackend
from multimoe.serving.engine import Engine, pick_token

PROMPTS = ["hello there", "what is 2+2?", "code: x=1", "ok"]
TENANTS = ["base", "chat", "code", "tied"]


def run(engine: Engine, requests: list[Request]):
    """Every request to its end in one batch; (tokens, text, finish reason) per request id."""
    batch = engine.prefill(requests)
    while len(batch.finished_rows()) < len(batch.requests):
        batch = engine.decode(batch)
    return {
        request.request_id: (batch.tokens[row], engine.text(batch, row), batch.finish_reasons[row])
        for row, request in enumerate(batch.requests)
    }


def requests(**settings) -> list[Request]:
    return [Request(index, TENANTS[index], 0.0, PROMPTS[index], 8, **settings) for index in range(4)]


@pytest.fixture
def engine(multi, tokenizer):
    return Engine(multi, tokenizer, SharedPoolBackend(multi).prepare)


def test_a_seeded_row_samples_the_same_tokens_alone_and_in_a_mixed_batch(engine):
    mixed = requests(temperature=1.3, top_p=0.9, seed=11, ignore_eos=True)
    together = run(engine, mixed)
    for request in mixed:
        assert run(engine, [request])[request.request_id] == together[request.request_id], request
    again = run(engine, mixed)
    assert again == together
    greedy = run(engine, requests(ignore_eos=True))
    reseeded = run(engine, [dataclasses.replace(r, seed=12) for r in mixed])
    assert together != greedy and reseeded != together  # sampling happened, and the seed decides it


def test_temperature_zero_and_a_tiny_nucleus_are_greedy(engine, multi, tokenizer):
    greedy = run(engine, requests(ignore_eos=True))
    nucleus = run(engine, requests(temperature=1.0, top_p=1e-9, seed=0, ignore_eos=True))
    assert nucleus == greedy
    request = requests()[1]
    inputs = tokenizer(request.prompt, return_tensors="pt")
    expected = multi.generate(**inputs, tenant=request.tenant, max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    assert greedy[1][0] == expected[0, inputs["input_ids"].shape[1]:].tolist()


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    request = Request(0, "a", 0.0, "x", 1, temperature=1.0, top_p=0.75)
    generator = torch.Generator().manual_seed(0)
    drawn = {pick_token(logits, request, generator) for _ in range(400)}
    assert drawn == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3: tokens 2 and 3 are cut


def test_a_stop_string_ends_its_row_and_is_cut_from_the_text(engine):
    greedy = run(engine, requests(ignore_eos=True))
    tokens, text, _ = greedy[0]
    stop = text[3:5]  # a piece of what "base" generates
    assert len(stop) == 2 and text.find(stop) == 3
    stopped = run(engine, [dataclasses.replace(r, stop=(stop, "never")) if r.tenant == "base" else r
                           for r in requests(ignore_eos=True)])
    assert stopped[0][1] == text[:3] and stopped[0][2] == "stop" and len(stopped[0][0]) < len(tokens)
    for request_id in (1, 2, 3):
        assert stopped[request_id] == greedy[request_id] and greedy[request_id][2] == "length"


def test_each_tenant_stops_at_its_own_eos(multi, tokenizer):
    greedy = run(Engine(multi, tokenizer, SharedPoolBackend(multi).prepare), requests(ignore_eos=True))
    model = copy.copy(multi)
    model.generation_configs = copy.deepcopy(multi.generation_configs)
    third = greedy[1][0][2]  # the third token "chat" generates becomes its EOS
    model.generation_configs["chat"].eos_token_id = [third, 999]
    engine = Engine(model, tokenizer, SharedPoolBackend(multi).prepare)
    stopped = run(engine, requests())
    assert stopped[1][0] == greedy[1][0][:3] and stopped[1][2] == "stop"
    for request_id in (0, 2, 3):  # the other tenants' EOS did not change
        tokens, _, reason = stopped[request_id]
        eos = engine.eos_ids(TENANTS[request_id])
        assert third not in eos and (reason == "length" or tokens[-1] in eos)
    assert run(engine, requests(ignore_eos=True))[1] == greedy[1]


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        ("temperature", -0.5, ValueError, "temperature of request 7 must be at least 0"),
        ("temperature", float("nan"), ValueError, "temperature of request 7 must be a finite number"),
        ("top_p", 0.0, ValueError, "top_p of request 7 must be positive"),
        ("top_p", 1.5, ValueError, "top_p of request 7 must be at most 1"),
        ("seed", 1.5, TypeError, "seed of request 7 must be an int"),
        ("stop", "end", ValueError, "stop of request 7 must be a list of non-empty strings"),
        ("stop", ["ok", ""], ValueError, "stop of request 7 must be a list of non-empty strings"),
        ("ignore_eos", 1, TypeError, "ignore_eos of request 7 must be a bool"),
    ],
)
def test_bad_decoding_settings_are_refused(field, value, error, message):
    fields = {"request_id": 7, "tenant": "base", "arrival_s": 0.5, "prompt": "hi", "max_new_tokens": 2}
    with pytest.raises(error, match=message):
        Request(**{**fields, field: value})


def test_rows_that_leave_take_their_padding_with_them(engine, multi, tokenizer):
    """A long prompt's row leaves: the positions only it used go too, so a busy server's cache does
    not grow for as long as it runs; the rows that stay generate what they would have."""
    long = Request(0, "base", 0.0, "hello there, a long prompt", 2, ignore_eos=True)
    short = Request(1, "chat", 0.0, "hi", 6, ignore_eos=True)
    alone = run(engine, [short])[1]
    batch = engine.decode(engine.prefill([long, short]))  # the long row is done after 2 tokens
    assert batch.finish_reasons == ["length", None]
    batch = batch.keep([1], multi.config)
    length = len(tokenizer("hi")["input_ids"]) + 1  # the prompt and the token fed back
    assert batch.attention_mask.shape[1] == length and batch.attention_mask.all()
    assert all(keys.shape[2] == length for keys, _ in ((layer.keys, layer.values) for layer in batch.cache.layers))
    while batch.finish_reasons[0] is None:
        batch = engine.decode(batch)
    assert (batch.tokens[0], engine.text(batch, 0), batch.finish_reasons[0]) == alone
