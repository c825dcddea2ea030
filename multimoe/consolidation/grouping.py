"""Grouping: which experts of different tenants are candidates to become one pool entry.

Every grouping is built around the anchor tenant (see `consolidate(anchor=...)`): a group holds
one anchor expert and, for each other tenant, the one local expert matched to it, with that
expert's distance to the anchor. Each local expert belongs to exactly one group, so a pool entry
can serve at most one expert per tenant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .registry import Registry


@dataclass(frozen=True)
class ExpertGroup:
    """Local expert index per tenant; `distances[t]` is t's member's distance to the anchor's."""

    members: dict[str, int]
    distances: dict[str, float]


# distances[t] is [E, E]: tenant t's experts (rows) against the anchor tenant's experts (columns).
Grouping = Callable[[str, Mapping[str, torch.Tensor]], list[ExpertGroup]]
GROUPINGS: Registry[Grouping] = Registry("grouping")
register_grouping = GROUPINGS.register
get_grouping = GROUPINGS.lookup


@register_grouping("same_index")
def same_index(anchor: str, distances: Mapping[str, torch.Tensor]) -> list[ExpertGroup]:
    """Expert i of every tenant with expert i of the anchor (the paper)."""
    experts = next(iter(distances.values())).shape[1]
    return [
        ExpertGroup(
            {anchor: e, **{t: e for t in distances}},
            {anchor: 0.0, **{t: float(d[e, e]) for t, d in distances.items()}},
        )
        for e in range(experts)
    ]


@register_grouping("cross_index")
def cross_index(anchor: str, distances: Mapping[str, torch.Tensor]) -> list[ExpertGroup]:
    """Each tenant's experts matched to the anchor's by an optimal assignment (least total
    distance), so expert 3 of one tenant can join expert 5 of another."""
    # Imported here: serving and loading need no scipy (the GPU machine's Python has none to spare).
    from scipy.optimize import linear_sum_assignment

    experts = next(iter(distances.values())).shape[1]
    members = [{anchor: e} for e in range(experts)]
    gaps = [{anchor: 0.0} for _ in range(experts)]
    for tenant, matrix in distances.items():
        rows, columns = linear_sum_assignment(matrix.double().numpy())
        for row, column in zip(rows, columns):
            members[column][tenant] = int(row)
            gaps[column][tenant] = float(matrix[row, column])
    return [ExpertGroup(m, g) for m, g in zip(members, gaps)]


__all__ = ["ExpertGroup", "GROUPINGS", "get_grouping", "register_grouping"]
