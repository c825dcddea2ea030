"""Loss-aware allocation of the budget (`consolidate(allocation="loss")`): each candidate merge is
priced by the rise of its own tenant's calibration loss when merged alone, and the budget takes the
cheapest first."""

from __future__ import annotations

import math

import pytest
import torch

from multimoe import consolidate
from multimoe.assembly import TenantSet
from multimoe.consolidation.allocation import measured_rises
from multimoe.consolidation.api import Footprint, Planner
from multimoe.consolidation.calibration import language_model_loss, per_tenant_data

CALIBRATION = {
    "base": ["hello there", "the cat sat on the mat"],
    "chat": ["how are you? fine", "hi there, friend"],
    "code": ["def f(x): return x", "print(1 + 2)"],
}


@pytest.fixture(scope="module")
def three(tenants) -> dict:
    return {name: tenants[name] for name in CALIBRATION}


def consolidated(three, tokenizer, **options):
    return consolidate(three, calibration=CALIBRATION, tokenizer=tokenizer, merge="keep_anchor", progress=False,
                       **options)


def test_a_measured_rise_is_the_loss_of_merging_that_expert_alone(three, tokenizer):
    tenants = TenantSet.open(three)
    planner = Planner(tenants, Footprint.of(tenants), "base", "weight_l2", "cross_index", None, progress=False)
    data = per_tenant_data(CALIBRATION, list(three), tokenizer)
    rises = measured_rises(planner, data, progress=False)
    assert set(rises) == {(c.layer, c.group, c.tenant) for c in planner.candidates}
    lossless = consolidated(three, tokenizer)
    for (layer_idx, group_idx, name), rise in list(rises.items())[:: len(rises) // 4]:
        group = planner.groups[layer_idx][group_idx]
        layer = lossless.model.layers[layer_idx]
        own = layer.tenants[name].get_submodule(layer.experts_path).expert_map
        before = language_model_loss(lossless, data[name], tenant=name)
        kept = int(own[group.members[name]])
        own[group.members[name]] = lossless.config.expert_map("base", layer_idx)[group.members["base"]]
        try:
            expected = language_model_loss(lossless, data[name], tenant=name) - before
        finally:
            own[group.members[name]] = kept
        assert rise == pytest.approx(expected, abs=1e-5)
        if group.distances[name] == 0:  # an identical expert merges for free
            assert rise == pytest.approx(0.0, abs=1e-6)


def test_the_budget_takes_the_cheapest_measured_merges_first(three, tokenizer):
    budget = consolidated(three, tokenizer, threshold=math.inf).consolidation_report.bytes_after
    budget = (budget + consolidated(three, tokenizer).consolidation_report.bytes_after) // 2
    by_loss = consolidated(three, tokenizer, memory_budget=budget, allocation="loss")
    by_distance = consolidated(three, tokenizer, memory_budget=budget)
    report = by_loss.consolidation_report
    assert report.deciding_limit == "memory_budget" and report.bytes_after <= budget
    assert report.bytes_after == by_distance.consolidation_report.bytes_after  # the same number of merges
    # Measured on the same calibration data, the loss-ranked choice raises the tenants' losses no more.
    assert sum(report.loss_after.values()) <= sum(by_distance.consolidation_report.loss_after.values()) + 1e-6


def test_allocation_is_checked_before_any_tenant_is_opened():
    with pytest.raises(ValueError, match="allocation must be one of"):
        consolidate({"a": "/nonexistent/a", "b": "/nonexistent/b"}, allocation="fisher", progress=False)
    with pytest.raises(ValueError, match="need calibration data"):
        consolidate({"a": "/nonexistent/a", "b": "/nonexistent/b"}, allocation="loss", progress=False)


def test_loss_allocation_leaves_the_anchor_and_identical_experts_alone(three, tokenizer, batch):
    lossless = consolidated(three, tokenizer).consolidation_report.bytes_after
    model = consolidated(three, tokenizer, memory_budget=lossless, allocation="loss")
    for name in three:  # only identical experts shared: every tenant as it was
        with torch.no_grad():
            expected = three[name](**batch).logits
            torch.testing.assert_close(model(**batch, tenant=name).logits, expected, rtol=0, atol=1e-5)
