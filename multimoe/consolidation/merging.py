"""Merge rules, registered by name: how the members of one pool entry become one expert.

A rule gets the members' experts and their usage (how often each member's router picked it on
calibration data; `None` without calibration) and returns one (gate_up, down) pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .registry import Registry

ExpertPair = tuple[torch.Tensor, torch.Tensor]
MergeRule = Callable[[Sequence[ExpertPair], "Sequence[float] | None"], ExpertPair]

MERGE_RULES: Registry[MergeRule] = Registry("merge rule")
register_merge = MERGE_RULES.register
get_merge = MERGE_RULES.lookup
NEEDS_USAGE = MERGE_RULES.needs_calibration


def weighted_sum(members: Sequence[ExpertPair], weights: Sequence[float]) -> ExpertPair:
    if all(torch.equal(a, b) for member in members[1:] for a, b in zip(member, members[0])):
        return members[0]  # identical members merge losslessly, without rounding
    total = float(sum(weights))
    return tuple(
        sum((w / total) * member[part].float() for w, member in zip(weights, members)).to(members[0][part].dtype)
        for part in (0, 1)
    )


@register_merge("select")
def select(members: Sequence[ExpertPair], usage: Sequence[float] | None) -> ExpertPair:
    """Keep one member unchanged (the paper's rule): the most used one, else the first."""
    if usage is None:
        return members[0]
    return members[max(range(len(members)), key=lambda index: usage[index])]


@register_merge("average")
def average(members: Sequence[ExpertPair], usage: Sequence[float] | None) -> ExpertPair:
    """Uniform mean of the members' weights."""
    return weighted_sum(members, [1.0] * len(members))


@register_merge("usage_weighted", needs_calibration=True)
def usage_weighted(members: Sequence[ExpertPair], usage: Sequence[float] | None) -> ExpertPair:
    """Mean weighted by how often each tenant's router picks its member on calibration data, so
    the tenant that relies on an expert most keeps it closest."""
    if usage is None:
        raise ValueError("The 'usage_weighted' merge rule needs calibration data.")
    weights = [u + 1e-6 for u in usage]  # a never-used member still counts a little
    return weighted_sum(members, weights)


__all__ = ["MERGE_RULES", "NEEDS_USAGE", "get_merge", "register_merge"]
