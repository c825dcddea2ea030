"""Mixed-tenant batches: every row gets exactly what its tenant's original model gives it."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from multimoe import CacheTenantMismatchError, UnknownTenantError
from multimoe.routing import tenant_order

PROMPTS = ["hello there", "hi", "what is 2+2?", "code: x=1", "ok"]
ROW_TENANTS = ["chat", "base", "tied", "chat", "code"]


@pytest.fixture
def mixed_batch(tokenizer):
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def test_mixed_batch_logits_match_each_rows_original(multi, tenants, mixed_batch):
    with torch.no_grad():
        actual = multi(**mixed_batch, tenant_names=ROW_TENANTS).logits
        for row, name in enumerate(ROW_TENANTS):
            expected = tenants[name](**mixed_batch).logits[row]
            mask = mixed_batch["attention_mask"][row].bool()
            torch.testing.assert_close(actual[row][mask], expected[mask], rtol=0, atol=1e-5)


def test_tenants_in_runs_need_no_gathering_and_give_the_same_rows(multi, mixed_batch):
    order = tenant_order(ROW_TENANTS)
    assert order == [0, 3, 1, 2, 4]
    grouped = {key: value[order] for key, value in mixed_batch.items()}
    grouped_tenants = [ROW_TENANTS[row] for row in order]
    interleaved = multi.model.route(len(ROW_TENANTS), tenant_names=ROW_TENANTS)
    runs = multi.model.route(len(ROW_TENANTS), tenant_names=grouped_tenants)
    assert runs.order is None and interleaved.order.tolist() == order
    assert runs.groups == interleaved.groups == (
        ("chat", slice(0, 2)), ("base", slice(2, 3)), ("tied", slice(3, 4)), ("code", slice(4, 5))
    )
    with torch.no_grad():
        expected = multi(**mixed_batch, tenant_names=ROW_TENANTS).logits[order]
        actual = multi(**grouped, tenant_names=grouped_tenants).logits
    # The rows reach the kernels in other batch positions, so the sums may round differently (up to
    # a few ulps of logits around 3, seen on AVX-512); the routing itself is checked exactly above.
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_mixed_batch_leaves_the_active_tenant_alone(multi, mixed_batch):
    multi.set_active_model("code")
    with torch.no_grad():
        multi(**mixed_batch, tenant_names=ROW_TENANTS)
    assert multi.active_model == "code"


def alone(tenants, tokenizer, prompt, name, **settings):
    """The continuation the original model gives one unpadded prompt."""
    inputs = tokenizer(prompt, return_tensors="pt")
    output = tenants[name].generate(**inputs, **settings)
    return output[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_mixed_generation_equals_each_row_generated_alone(multi, tenants, tokenizer, mixed_batch, num_beams):
    settings = dict(max_new_tokens=10, min_new_tokens=10, num_beams=num_beams, do_sample=False, pad_token_id=0)
    output = multi.generate(**mixed_batch, tenant_names=ROW_TENANTS, **settings)
    continuations = output[:, mixed_batch["input_ids"].shape[1] :]
    for row, (prompt, name) in enumerate(zip(PROMPTS, ROW_TENANTS)):
        assert torch.equal(continuations[row : row + 1], alone(tenants, tokenizer, prompt, name, **settings)), (row, name)


def test_mixed_beams_with_several_return_sequences(multi, tenants, tokenizer, mixed_batch):
    settings = dict(max_new_tokens=6, min_new_tokens=6, num_beams=3, num_return_sequences=2, pad_token_id=0)
    output = multi.generate(**mixed_batch, tenant_names=ROW_TENANTS, **settings)
    continuations = output[:, mixed_batch["input_ids"].shape[1] :]
    for row, (prompt, name) in enumerate(zip(PROMPTS, ROW_TENANTS)):
        expected = alone(tenants, tokenizer, prompt, name, **settings)
        assert torch.equal(continuations[2 * row : 2 * row + 2], expected), (row, name)


def test_mixed_sampling_runs_per_row(multi, mixed_batch):
    greedy = multi.generate(**mixed_batch, tenant_names=ROW_TENANTS, max_new_tokens=6, do_sample=False, pad_token_id=0)
    sampled = multi.generate(
        **mixed_batch, tenant_names=ROW_TENANTS, max_new_tokens=6, do_sample=True, top_k=1, pad_token_id=0
    )
    assert torch.equal(sampled, greedy)


def test_mixed_incremental_decoding_matches(multi, tenants, mixed_batch):
    steps = torch.randint(4, 40, (len(PROMPTS), 3), generator=torch.Generator().manual_seed(0))

    def decode(model, **routing):
        mask = mixed_batch["attention_mask"]
        out = model(**mixed_batch, cache=DynamicCache(config=model.config), use_cache=True, **routing)
        logits = [out.logits[:, -1]]
        for step in steps.T:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=step[:, None], attention_mask=mask, cache=out.cache, use_cache=True, **routing)
            logits.append(out.logits[:, -1])
        return torch.stack(logits, dim=1)

    with torch.no_grad():
        actual = decode(multi, tenant_names=ROW_TENANTS)
        for row, name in enumerate(ROW_TENANTS):
            torch.testing.assert_close(actual[row], decode(tenants[name])[row], rtol=0, atol=1e-5)


def test_a_cache_cannot_be_continued_under_another_tenant(multi, batch):
    with torch.no_grad():
        out = multi(**batch, tenant="chat", use_cache=True)
        step = torch.tensor([[5], [6]])
        mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        with pytest.raises(CacheTenantMismatchError, match=r"tenants \['chat', 'chat'\].*\['base', 'base'\]"):
            multi(input_ids=step, attention_mask=mask, cache=out.cache, tenant="base")
        with pytest.raises(CacheTenantMismatchError):
            multi(input_ids=step, attention_mask=mask, cache=out.cache, tenant_names=["chat", "code"])
        assert out.cache.get_seq_length() == batch["input_ids"].shape[1]  # refused before any update
        multi(input_ids=step, attention_mask=mask, cache=out.cache, tenant="chat")  # its own tenant continues


@pytest.mark.parametrize(
    "routing, error, message",
    [
        (dict(tenant_names=["chat"]), ValueError, "one tenant per row"),
        (dict(tenant_names=["chat", "nope"]), UnknownTenantError, "'nope'"),
        (dict(tenant_names="chat"), ValueError, "one name per row"),
        (dict(tenant="chat", tenant_names=["chat", "base"]), ValueError, "only one of"),
        (dict(tenant_ids=torch.tensor([0, 9])), UnknownTenantError, "must index"),
        (dict(tenant_names=["chat", "base"], output_router_logits=True), ValueError, "per tenant"),
    ],
)
def test_bad_row_routing_is_refused(multi, batch, routing, error, message):
    with pytest.raises(error, match=message), torch.no_grad():
        multi(**batch, **routing)


@pytest.mark.parametrize(
    "routing, message",
    [(dict(tenant="chat", tenant_names=["chat", "base"]), "only one of"), (dict(tenant_names="chat"), "one name per row")],
)
def test_generate_refuses_bad_row_routing_like_forward(multi, batch, routing, message):
    with pytest.raises(ValueError, match=message):
        multi.generate(**batch, max_new_tokens=2, pad_token_id=0, **routing)
