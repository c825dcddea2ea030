"""Merge rules, registered by name: how the members of one pool entry become one expert.

A rule gets a `MergeGroup`: the members' experts and, with calibration, each member's usage (how
often its tenant's router picked it) and the hidden states its tenant feeds this layer; it
returns one (gate_up, down) pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .registry import Registry
from .similarity import expert_outputs

ExpertPair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class MergeGroup:
    members: Sequence[ExpertPair]
    usage: Sequence[float] | None = None
    inputs: Sequence[torch.Tensor] | None = None
    hidden_act: str = "silu"


MergeRule = Callable[[MergeGroup], ExpertPair]

MERGE_RULES: Registry[MergeRule] = Registry("merge rule")
register_merge = MERGE_RULES.register
get_merge = MERGE_RULES.lookup
NEEDS_USAGE = MERGE_RULES.needs_calibration


def identical(members: Sequence[ExpertPair]) -> bool:
    return all(torch.equal(a, b) for member in members[1:] for a, b in zip(member, members[0]))


def weighted_sum(members: Sequence[ExpertPair], weights: Sequence[float]) -> ExpertPair:
    if identical(members):
        return members[0]  # identical members merge losslessly, without rounding
    total = float(sum(weights))
    return tuple(
        sum((w / total) * member[part].float() for w, member in zip(weights, members)).to(members[0][part].dtype)
        for part in (0, 1)
    )


@register_merge("select")
def select(group: MergeGroup) -> ExpertPair:
    """Keep one member unchanged (the paper's rule): the most used one, else the first."""
    if group.usage is None:
        return group.members[0]
    return group.members[max(range(len(group.members)), key=lambda index: group.usage[index])]


@register_merge("keep_anchor")
def keep_anchor(group: MergeGroup) -> ExpertPair:
    """Keep the anchor tenant's member unchanged, whatever the usage: the anchor stays lossless."""
    return group.members[0]


@register_merge("average")
def average(group: MergeGroup) -> ExpertPair:
    """Uniform mean of the members' weights."""
    return weighted_sum(group.members, [1.0] * len(group.members))


@register_merge("usage_weighted", needs_calibration=True)
def usage_weighted(group: MergeGroup) -> ExpertPair:
    """Mean weighted by how often each tenant's router picks its member on calibration data, so
    the tenant that relies on an expert most keeps it closest."""
    if group.usage is None:
        raise ValueError("The 'usage_weighted' merge rule needs calibration data.")
    return weighted_sum(group.members, [u + 1e-6 for u in group.usage])  # a never-used member still counts


@register_merge("output_medoid", needs_calibration=True)
def output_medoid(group: MergeGroup) -> ExpertPair:
    """Keep the member that distorts the merged tenants least: for each candidate, the relative
    change of every tenant's expert output on the hidden states that tenant really feeds this
    layer, summed over tenants (each tenant counts equally, however rarely it routes here)."""
    if group.inputs is None:
        raise ValueError("The 'output_medoid' merge rule needs calibration data.")
    if identical(group.members):
        return group.members[0]
    own = [expert_outputs(tuple(p[None] for p in member), inputs, group.hidden_act)[0]
           for member, inputs in zip(group.members, group.inputs)]

    def distortion(candidate: ExpertPair) -> float:
        experts = tuple(p[None] for p in candidate)
        return sum(
            float((expert_outputs(experts, inputs, group.hidden_act)[0] - reference).norm() / reference.norm().clamp(min=1e-12))
            for inputs, reference in zip(group.inputs, own)
        )

    return min(group.members, key=distortion)


__all__ = ["MERGE_RULES", "MergeGroup", "NEEDS_USAGE", "get_merge", "register_merge"]
