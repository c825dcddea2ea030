"""Calibration runs each original tenant one decoder layer at a time, for every family: the same
statistics as the tenant's whole model, with at most one decoder layer's weights in memory; and
`consolidate` never holds two result-sized models at once."""

from __future__ import annotations

import copy
import math
import weakref

import pytest
import torch

from multimoe import FAMILIES, classes_for, consolidate
from multimoe.assembly import TenantSet
from multimoe.consolidation.calibration import BATCH_ROWS, ExpertCalls, collect, language_model_loss, per_tenant_data
from multimoe.testing import fine_tune, random_model, tiny_config

# Left-padded prompt/completion pairs of many lengths, over more than one calibration chunk.
PAIRS = [
    {"prompt": "what is 2+2? ", "completion": "it is 4"},
    {"prompt": "hi", "completion": " there, how are you today?"},
    {"prompt": "sort dcba: ", "completion": "abcd"},
    {"prompt": "reverse abc: ", "completion": "cba"},
    {"prompt": "ok", "completion": " then"},
] * 2 + [{"prompt": "shift bcd by one: ", "completion": "cde"}]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def sources(request) -> dict:
    """A base, a fine-tune of it, and an unrelated tenant whose lm_head is its embedding matrix."""
    base = random_model(tiny_config(request.param), seed=0)
    return {
        "base": base,
        "tuned": fine_tune(base, seed=1, changed_experts={0, 1}),
        "tied": random_model(tiny_config(request.param, tie_word_embeddings=True), seed=2),
    }


def calibrated(sources: dict, tokenizer):
    tenants = TenantSet.open(sources)
    data = per_tenant_data(PAIRS, tenants.names, tokenizer, tenants.family.is_encoder_decoder)
    assert math.ceil(len(PAIRS) / BATCH_ROWS) > 1  # the stubs must hand each chunk its own outputs
    return tenants, data


def whole_model_statistics(sources: dict, tenants: TenantSet, data: dict, max_rows: int) -> dict:
    """The reference: each tenant's whole original model, recorded by the hooks `collect` uses, its
    layers' inputs sampled in the same order (one generator, tenant by tenant, layer by layer)."""
    generator, statistics = torch.Generator().manual_seed(0), {}
    for name in tenants.names:
        model = copy.deepcopy(sources[name])  # the hooks stay on the copy
        calls = ExpertCalls(model, tenants.family, tenants.checkpoints[name].num_experts)
        loss = language_model_loss(model, data[name])
        inputs = [calls.sample(layer_idx, max_rows, generator) for layer_idx in range(tenants.num_layers)]
        statistics[name] = loss, calls.counts, inputs
    return statistics


def test_layer_by_layer_statistics_equal_the_whole_models(sources, tokenizer):
    tenants, data = calibrated(sources, tokenizer)
    streamed = collect(tenants, data, max_rows_per_layer=24)
    whole = whole_model_statistics(sources, tenants, data, max_rows=24)
    assert streamed.losses.keys() == whole.keys() == set(sources)
    for name, (loss, usage, inputs) in whole.items():
        assert streamed.losses[name] == pytest.approx(loss, rel=1e-5)
        assert torch.equal(streamed.usage[name], usage)
        assert usage.sum() > 0
        for layer_idx, (actual, expected) in enumerate(zip(streamed.layer_inputs[name], inputs, strict=True)):
            assert (actual is None) == (expected is None) == (not tenants.sparse_layers[layer_idx])
            if expected is not None:  # the same rows, sampled in the same order
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_at_most_one_decoder_layer_holds_weights(sources, tokenizer):
    tenants, data = calibrated(sources, tokenizer)
    family = tenants.family
    seen = {"model": None, "most": 0, "ran": set()}

    def count_real_layers(module, args):
        if isinstance(module, family.model_class):
            seen["model"] = module
        elif isinstance(module, family.decoder_layer_class):
            model, inside = seen["model"], tuple(f"{path}." for path in tenants.layer_paths)
            layers = [model.get_submodule(path) for path in tenants.layer_paths]
            real = [i for i, layer in enumerate(layers) if any(not p.is_meta for p in layer.parameters())]
            seen["most"] = max(seen["most"], len(real))
            seen["ran"].update(real)
            outer = [p for name, p in model.named_parameters() if not name.startswith(inside)]
            assert outer and not any(p.is_meta for p in outer)  # the embeddings, final norms and head stay real

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count_real_layers)
    try:
        collect(tenants, data, max_rows_per_layer=8)
    finally:
        handle.remove()
    assert seen["most"] == 1
    assert seen["ran"] == set(range(tenants.num_layers))


def test_consolidate_holds_one_result_sized_model_at_a_time(tokenizer, monkeypatch):
    # Unrelated tenants with large weights: averaging their experts raises a loss, and the guard binds.
    config = tiny_config("mixtral", initializer_range=1.0)
    models = {name: random_model(config, seed=seed) for seed, name in enumerate("ab")}
    model_class = classes_for(FAMILIES["mixtral"])[2]
    build, built = model_class.from_assembly, weakref.WeakSet()

    def tracked_build(cls, tenants, config, state_dict):
        assert not built, "a model built earlier is still alive"
        model = build(tenants, config, state_dict)
        built.add(model)
        return model

    monkeypatch.setattr(model_class, "from_assembly", classmethod(tracked_build))
    model = consolidate(models, threshold=math.inf, merge="average", anchor="most_sensitive", max_quality_loss=0.0,
                        calibration=PAIRS, tokenizer=tokenizer, progress=False)
    assert model.consolidation_report.deciding_limit == "max_quality_loss"  # the bisection built models too
    assert list(built) == [model]
