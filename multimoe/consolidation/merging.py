"""Merge rules, registered by name: how the members of one pool entry become one expert.

A rule gets a `MergeGroup`: the members' experts (each a tuple of tensors in the family's fused
layout, without the experts dimension) and, with calibration, each member's usage (how often its
tenant's router picked it) and the hidden states its tenant feeds this layer; it returns one
expert in the same layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..assembly import ExpertTensors
from .registry import Registry
from .similarity import RunExperts


@dataclass(frozen=True)
class MergeGroup:
    members: Sequence[ExpertTensors]
    usage: Sequence[float] | None = None
    inputs: Sequence[torch.Tensor] | None = None
    run_experts: RunExperts | None = None  # the family's experts, for rules that compare outputs


MergeRule = Callable[[MergeGroup], ExpertTensors]

MERGE_RULES: Registry[MergeRule] = Registry("merge rule")
register_merge = MERGE_RULES.register
get_merge = MERGE_RULES.lookup
NEEDS_USAGE = MERGE_RULES.needs_calibration
# Rules whose entry is one member unchanged: that member needs no delta (`consolidate(delta_rank=)`).
KEEPS_A_MEMBER = {"select", "keep_anchor", "output_medoid"}


def identical(members: Sequence[ExpertTensors]) -> bool:
    return all(torch.equal(a, b) for member in members[1:] for a, b in zip(member, members[0]))


def weighted_sum(members: Sequence[ExpertTensors], weights: Sequence[float]) -> ExpertTensors:
    if identical(members):
        return members[0]  # identical members merge losslessly, without rounding
    total = float(sum(weights))
    return tuple(
        sum((w / total) * tensor.float() for w, tensor in zip(weights, tensors)).to(tensors[0].dtype)
        for tensors in zip(*members)
    )


@register_merge("select")
def select(group: MergeGroup) -> ExpertTensors:
    """Keep one member unchanged (the paper's rule): the most used one, else the first."""
    if group.usage is None:
        return group.members[0]
    return group.members[max(range(len(group.members)), key=lambda index: group.usage[index])]


@register_merge("keep_anchor")
def keep_anchor(group: MergeGroup) -> ExpertTensors:
    """Keep the anchor tenant's member unchanged, whatever the usage: the anchor stays lossless."""
    return group.members[0]


@register_merge("average")
def average(group: MergeGroup) -> ExpertTensors:
    """Uniform mean of the members' weights."""
    return weighted_sum(group.members, [1.0] * len(group.members))


@register_merge("usage_weighted", needs_calibration=True)
def usage_weighted(group: MergeGroup) -> ExpertTensors:
    """Mean weighted by how often each tenant's router picks its member on calibration data, so
    the tenant that relies on an expert most keeps it closest."""
    if group.usage is None:
        raise ValueError("The 'usage_weighted' merge rule needs calibration data.")
    return weighted_sum(group.members, [u + 1e-6 for u in group.usage])  # a never-used member still counts


@register_merge("output_medoid", needs_calibration=True)
def output_medoid(group: MergeGroup) -> ExpertTensors:
    """Keep the member that distorts the merged tenants least: for each candidate, the relative
    change of every tenant's expert output on the hidden states that tenant really feeds this
    layer, summed over tenants (each tenant counts equally, however rarely it routes here)."""
    if group.inputs is None or group.run_experts is None:
        raise ValueError("The 'output_medoid' merge rule needs calibration data and the family's experts.")
    if identical(group.members):
        return group.members[0]
    # One run of every member on every tenant's inputs: outputs[t][c] is member c's output on
    # tenant t's inputs, and outputs[t][t] what tenant t computes today.
    stacked = tuple(torch.stack(tensors) for tensors in zip(*group.members))
    rows = [len(inputs) for inputs in group.inputs]
    outputs = group.run_experts(stacked, torch.cat(list(group.inputs))).split(rows, dim=1)

    def distortion(candidate: int) -> float:
        return sum(
            float((output[candidate] - output[tenant]).norm() / output[tenant].norm().clamp(min=1e-12))
            for tenant, output in enumerate(outputs)
        )

    return group.members[min(range(len(group.members)), key=distortion)]


__all__ = ["KEEPS_A_MEMBER", "MERGE_RULES", "MergeGroup", "NEEDS_USAGE", "get_merge", "register_merge"]
