"""Property: for any small Mixtral shape, any 1-4 tenants and any sequence of tenant choices
(`set_active_model`, `tenant=`, `active()` blocks, mixed batches), every logit of a left-padded
batch equals the one the tenant's original `MixtralForCausalLM` gives, to 1e-5.

Examples are derandomized, so CI runs the same ones every time; the bound keeps the file fast.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from multimoe import MultiTenantMixtralForCausalLM
from multimoe.testing import fine_tune, random_mixtral, tiny_mixtral_config

TOLERANCE = 1e-5
PAD = 0

TENANT_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,5}", fullmatch=True).filter(
    lambda name: not hasattr(nn.ModuleDict(), name)
)


@st.composite
def mixtral_fields(draw) -> dict:
    heads = draw(st.sampled_from([2, 4]))
    return dict(
        num_hidden_layers=draw(st.integers(1, 3)),
        num_local_experts=draw(st.integers(2, 6)),
        num_experts_per_tok=draw(st.integers(1, 2)),
        num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([kv for kv in (1, 2, 4) if heads % kv == 0])),
        hidden_size=heads * draw(st.sampled_from([4, 8])),
        intermediate_size=draw(st.sampled_from([8, 24])),
        tie_word_embeddings=draw(st.booleans()),
    )


@st.composite
def scenarios(draw) -> dict:
    """A shape, the tenants (the first a base; the others fine-tunes of it that move some experts,
    or unrelated models), a left-padded batch, and a sequence of tenant choices."""
    fields = draw(mixtral_fields())
    experts = fields["num_local_experts"]
    names = draw(st.lists(TENANT_NAMES, min_size=1, max_size=4, unique=True))
    derived = [
        draw(st.one_of(st.just(None), st.sets(st.integers(0, experts - 1))))  # None: an unrelated model
        for _ in names[1:]
    ]
    rows = draw(st.integers(2, 3))
    lengths = draw(st.lists(st.integers(1, 6), min_size=rows, max_size=rows))
    tenant = st.sampled_from(names)
    choice = st.one_of(
        st.tuples(st.just("set_active_model"), tenant),
        st.tuples(st.just("tenant"), tenant),
        st.tuples(st.just("active"), tenant),
        st.tuples(st.just("tenant_names"), st.lists(tenant, min_size=rows, max_size=rows)),
    )
    return dict(
        fields=fields,
        names=names,
        derived=derived,
        lengths=lengths,
        seed=draw(st.integers(0, 2**16)),
        choices=draw(st.lists(choice, min_size=1, max_size=6)),
    )


def build_tenants(scenario: dict) -> dict[str, nn.Module]:
    seed = scenario["seed"]
    config = tiny_mixtral_config(**scenario["fields"])
    base = random_mixtral(config, seed=seed)
    tenants = {scenario["names"][0]: base}
    for offset, (name, changed) in enumerate(zip(scenario["names"][1:], scenario["derived"]), start=1):
        if changed is None:
            tenants[name] = random_mixtral(config, seed=seed + offset)
        else:
            tenants[name] = fine_tune(base, seed=seed + offset, changed_experts=changed)
    return tenants


def left_padded_batch(lengths: list[int], vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(PAD + 4, vocab_size, (len(lengths), width), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, width - length :] = 1
    return dict(input_ids=input_ids.masked_fill(attention_mask == 0, PAD), attention_mask=attention_mask)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_every_tenant_choice_reproduces_the_original_models(scenario):
    tenants = build_tenants(scenario)
    model = MultiTenantMixtralForCausalLM.from_models(tenants).eval()
    batch = left_padded_batch(scenario["lengths"], model.config.vocab_size, scenario["seed"])
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = {name: tenant(**batch).logits for name, tenant in tenants.items()}
        active = model.active_model
        for how, which in scenario["choices"]:
            if how == "set_active_model":
                model.set_active_model(which)
                active = which
                logits = model(**batch).logits
            elif how == "active":
                with model.active(which):
                    logits = model(**batch).logits
            elif how == "tenant":
                logits = model(**batch, tenant=which).logits
            else:
                logits = model(**batch, tenant_names=which).logits
            row_tenants = which if how == "tenant_names" else [which] * len(scenario["lengths"])
            for row, name in enumerate(row_tenants):
                torch.testing.assert_close(
                    logits[row][real[row]], expected[name][row][real[row]], rtol=0, atol=TOLERANCE
                )
            assert model.active_model == active
