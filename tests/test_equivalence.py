"""Every tenant reproduces its original MixtralForCausalLM: logits, cache, generation, pipeline."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, pipeline

TOLERANCE = 1e-5
TENANTS = ["base", "chat", "code", "tied"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE)


def test_tenants_really_differ(tenants, batch):
    # Guard against a fixture that would make the equivalence tests vacuous.
    logits = {name: model(**batch).logits for name, model in tenants.items()}
    for name in TENANTS[1:]:
        assert (logits[name] - logits["base"]).abs().max() > 1e-2


@pytest.mark.parametrize("name", TENANTS)
def test_left_padded_batch_logits_match(multi, tenants, batch, name):
    multi.set_active_model(name)
    with torch.no_grad():
        actual = multi(**batch).logits
        expected = tenants[name](**batch).logits
    mask = batch["attention_mask"].bool()
    assert_close(actual[mask], expected[mask])


@pytest.mark.parametrize("name", TENANTS)
def test_per_call_tenant_matches_and_leaves_active_unchanged(multi, tenants, batch, name):
    multi.set_active_model("base")
    with torch.no_grad():
        actual = multi(**batch, tenant=name).logits
        expected = tenants[name](**batch).logits
    mask = batch["attention_mask"].bool()
    assert_close(actual[mask], expected[mask])
    assert multi.active_model == "base"


@pytest.mark.parametrize("name", TENANTS)
def test_incremental_decoding_with_cache_matches(multi, tenants, batch, name):
    multi.set_active_model(name)
    steps = torch.tensor([[5, 9], [7, 11]])

    def decode(model):
        cache = DynamicCache(config=model.config)
        mask = batch["attention_mask"]
        out = model(input_ids=batch["input_ids"], attention_mask=mask, cache=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        for step in steps.T:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=step[:, None], attention_mask=mask, cache=out.cache, use_cache=True)
            logits.append(out.logits[:, -1])
        return torch.stack(logits)

    with torch.no_grad():
        assert_close(decode(multi), decode(tenants[name]))


@pytest.mark.parametrize("name", TENANTS)
def test_greedy_generation_is_token_identical(multi, tenants, batch, name):
    multi.set_active_model(name)
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = tenants[name].generate(**batch, **settings)
    assert torch.equal(multi.generate(**batch, **settings), expected)


def test_generation_with_per_call_tenant(multi, tenants, batch):
    multi.set_active_model("base")
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = tenants["code"].generate(**batch, **settings)
    assert torch.equal(multi.generate(**batch, **settings, tenant="code"), expected)
    assert multi.active_model == "base"


@pytest.mark.parametrize("name", ["chat", "tied"])
def test_sampling_is_identical_under_the_same_seed(multi, tenants, batch, name):
    multi.set_active_model(name)
    settings = dict(max_new_tokens=10, do_sample=True, top_k=10, temperature=0.9, pad_token_id=0)
    torch.manual_seed(123)
    expected = tenants[name].generate(**batch, **settings)
    torch.manual_seed(123)
    assert torch.equal(multi.generate(**batch, **settings), expected)


@pytest.mark.parametrize("name", ["base", "code"])
def test_beam_search_is_identical(multi, tenants, batch, name):
    multi.set_active_model(name)
    settings = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    expected = tenants[name].generate(**batch, **settings)
    assert torch.equal(multi.generate(**batch, **settings), expected)


@pytest.mark.parametrize("name", ["chat", "tied"])
def test_pipeline_output_equals_original(multi, tenants, tokenizer, name):
    multi.set_active_model(name)
    settings = dict(max_new_tokens=10, do_sample=False)
    prompts = ["hello there", "what is 2"]
    expected = pipeline("text-generation", model=tenants[name], tokenizer=tokenizer)(prompts, **settings)
    actual = pipeline("text-generation", model=multi, tokenizer=tokenizer)(prompts, **settings)
    assert actual == expected


@pytest.mark.parametrize("name", ["base", "tied"])
def test_loss_router_logits_and_aux_loss_match(multi, tenants, batch, name):
    multi.set_active_model(name)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        actual = multi(**batch, labels=labels, output_router_logits=True)
        expected = tenants[name](**batch, labels=labels, output_router_logits=True)
    assert_close(actual.loss, expected.loss)
    assert_close(actual.aux_loss, expected.aux_loss)
    assert len(actual.router_logits) == len(expected.router_logits) == 2
    for ours, theirs in zip(actual.router_logits, expected.router_logits):
        assert_close(ours, theirs)


def test_hidden_states_and_eager_attentions_match(multi, tenants, batch):
    multi.set_active_model("code")
    reference = tenants["code"]
    try:
        for model in (multi, reference):
            model.set_attn_implementation("eager")
        with torch.no_grad():
            actual = multi(**batch, output_hidden_states=True, output_attentions=True)
            expected = reference(**batch, output_hidden_states=True, output_attentions=True)
    finally:
        for model in (multi, reference):
            model.set_attn_implementation("sdpa")
    assert len(actual.hidden_states) == multi.config.num_hidden_layers + 1
    assert len(actual.attentions) == multi.config.num_hidden_layers
    for ours, theirs in zip(actual.hidden_states + actual.attentions, expected.hidden_states + expected.attentions):
        assert_close(ours, theirs)


def test_return_dict_false_gives_a_tuple(multi, batch):
    with torch.no_grad():
        logits = multi(**batch, return_dict=False)[0]
    assert logits.shape[:2] == batch["input_ids"].shape


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_experts_implementations_agree(multi, tenants, batch, implementation):
    assert multi.config._experts_implementation == "grouped_mm"
    multi.set_active_model("chat")
    try:
        multi.set_experts_implementation(implementation)
        assert multi.config._experts_implementation == implementation
        with torch.no_grad():
            actual = multi(**batch).logits
    finally:
        multi.set_experts_implementation("grouped_mm")
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        assert_close(actual[mask], tenants["chat"](**batch).logits[mask])


def test_training_step_gets_gradients_only_for_the_active_tenant(tenants, batch):
    from multimoe import MultiTenantMixtralForCausalLM

    model = MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "chat": tenants["chat"]})
    model.train()
    model.set_active_model("chat")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    assert model.model.layers[0].tenants["chat"].self_attn.q_proj.weight.grad is not None
    assert model.model.layers[0].tenants["base"].self_attn.q_proj.weight.grad is None
    assert model.model.layers[0].experts.gate_up_proj.grad is not None
