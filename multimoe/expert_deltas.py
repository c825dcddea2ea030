"""Per-tenant low-rank expert deltas: a tenant whose expert was merged into a shared pool entry keeps
a rank-r correction of that expert, so that merging costs it less.

A delta is defined on the experts' declared layout (`Family.expert_program`): each of an expert's
matrices `W` [m, n] (`gate_up_proj`, `down_proj`, Switch's `wi.weight`, ... as the family stores
them, transposed or not) becomes `W + left.T @ right` with `left` [r, m] and `right` [r, n], and each
bias (gpt-oss) gets its whole difference. A tenant's deltas of one layer live in its own
`TenantExperts` (trained with its other layers, saved and removed with it), one tensor per expert
tensor, the experts' rank components one after another:

    <name>_delta_left   [R, m]    R = sum over the layer's experts of min(rank, m, n): a rank
    <name>_delta_right  [R, n]          (`config.delta_ranks`) beyond a matrix's own is its full rank
    <bias>_delta        [D, m]    one row per expert with a delta (rank > 0)

A call whose rows reach no delta runs the pool exactly as without deltas. Otherwise the pool still
runs once for all rows, entry by entry, and each slot (token, pick) adds its own tenant's correction,
computed per (tenant, expert) segment: the segmented low-rank product of S-LoRA and Punica.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def delta_names(name: str, is_matrix: bool) -> tuple[str, ...]:
    """The parameter names holding the delta of expert tensor `name` (`wi.weight` -> `wi_weight_...`)."""
    stem = name.replace(".", "_")
    return (f"{stem}_delta_left", f"{stem}_delta_right") if is_matrix else (f"{stem}_delta",)


@dataclass(frozen=True)
class DeltaLayout:
    """Where each local expert's delta lies in a tenant's delta tensors of one layer: a matrix whose
    full rank is `cap` holds min(rank, cap) components of each expert, one expert after another."""

    ranks: tuple[int, ...]  # per local expert; 0: no delta

    def total_rank(self, cap: int) -> int:
        return sum(min(rank, cap) for rank in self.ranks)

    @property
    def rows(self) -> int:
        """Experts with a delta: the rows of the bias deltas."""
        return sum(1 for rank in self.ranks if rank)

    def span(self, expert: int, cap: int) -> slice:
        start = self.total_rank_before(expert, cap)
        return slice(start, start + min(self.ranks[expert], cap))

    def total_rank_before(self, expert: int, cap: int) -> int:
        return sum(min(rank, cap) for rank in self.ranks[:expert])

    def row(self, expert: int) -> int:
        return sum(1 for rank in self.ranks[:expert] if rank)

    def parameter_shapes(self, expert_shapes: dict[str, torch.Size]) -> dict[str, tuple[int, ...]]:
        """The delta tensors' shapes, for an expert whose tensors have `expert_shapes`."""
        shapes = {}
        for name, shape in expert_shapes.items():
            if len(shape) == 2:
                left, right = delta_names(name, True)
                rank = self.total_rank(min(shape))
                shapes[left], shapes[right] = (rank, shape[0]), (rank, shape[1])
            else:
                shapes[delta_names(name, False)[0]] = (self.rows, *shape)
        return shapes


def max_rank(expert_shapes: dict[str, torch.Size]) -> int:
    """The largest rank a delta can use: the full rank of the expert's largest-rank matrix."""
    return max(min(shape) for shape in expert_shapes.values() if len(shape) == 2)


class ExpertDeltas:
    """The delta side of a `TenantExperts`: its `DeltaLayout` and the correction it adds."""

    layout: DeltaLayout

    def register_deltas(self, layout: DeltaLayout, expert_shapes: dict[str, torch.Size], dtype: torch.dtype) -> None:
        self.layout = layout
        self.caps = {name: min(shape) for name, shape in expert_shapes.items() if len(shape) == 2}
        if not layout.rows:
            return
        largest = max_rank(expert_shapes)
        if max(layout.ranks) > largest:
            raise ValueError(f"A delta rank of {max(layout.ranks)} exceeds the experts' largest full rank, {largest}.")
        for name, shape in layout.parameter_shapes(expert_shapes).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype)))

    @property
    def has_deltas(self) -> bool:
        return self.layout.rows > 0

    def correction(self, name: str, inputs: torch.Tensor, expert: int, transposed: bool) -> torch.Tensor:
        """What the delta of local expert `expert` adds to the product of expert matrix `name` with
        `inputs` (its bias's delta apart: `bias_correction`)."""
        span = self.layout.span(expert, self.caps[name])
        left_name, right_name = delta_names(name, True)
        left, right = getattr(self, left_name)[span], getattr(self, right_name)[span]
        # The matrix is left.T @ right [m, n]: y = x W.T (stored [out, in]) or y = x W (transposed).
        if transposed:
            return (inputs @ left.T) @ right
        return (inputs @ right.T) @ left

    def bias_correction(self, name: str, expert: int) -> torch.Tensor:
        return getattr(self, delta_names(name, False)[0])[self.layout.row(expert)]


def segments(keys: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """`keys` sorted (stably): the order, each distinct key and its count, in sorted order."""
    order = torch.argsort(keys, stable=True)
    values, counts = torch.unique_consecutive(keys[order], return_counts=True)
    return order, values.tolist(), counts.tolist()


def run_with_deltas(
    pool: nn.Module,
    program,
    hidden_states: torch.Tensor,
    slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    owners: list[ExpertDeltas],
) -> torch.Tensor:
    """The pool's output for `slots` (token, pool entry, routing weight, owner * E + local expert per
    token's pick), each slot corrected by its owner's delta of its local expert, where it has one.

    The products run entry by entry over the slots sorted by entry (as the family's kernels group
    them), then each (owner, expert) segment adds its low-rank product; `program` (the family's
    `ExpertProgram`) says which tensors the products use and what runs between them."""
    token, entry, weight, key = slots
    order, entries, counts = segments(entry)
    token, entry, weight, key = token[order], entry[order], weight[order], key[order]
    experts = len(owners[0].layout.ranks)

    def project(inputs: torch.Tensor, name: str, bias: str | None) -> torch.Tensor:
        pieces = []
        for pool_entry, rows in zip(entries, inputs.split(counts)):
            output = program.product(pool, name, pool_entry, rows)
            if bias is not None:
                output = output + program.tensor(pool, bias, pool_entry)
            pieces.append(output)
        output = torch.cat(pieces)
        by_key, keys, key_counts = segments(key)
        start, corrections, positions = 0, [], []
        for value, count in zip(keys, key_counts):
            rows = by_key[start : start + count]
            start += count
            owner, expert = owners[value // experts], value % experts
            if not owner.layout.ranks[expert]:
                continue
            delta = owner.correction(name, inputs[rows], expert, program.transposed)
            if bias is not None:
                delta = delta + owner.bias_correction(bias, expert)
            corrections.append(delta)
            positions.append(rows)
        if corrections:
            output = output.index_add(0, torch.cat(positions), torch.cat(corrections).to(output.dtype))
        return output

    hidden = project(hidden_states[token], program.first, program.first_bias)
    hidden = program.between(pool, hidden)
    output = project(hidden, program.second, program.second_bias) * weight[:, None]
    return torch.zeros_like(hidden_states).index_add(0, token, output.to(hidden_states.dtype))


__all__ = ["DeltaLayout", "ExpertDeltas", "delta_names", "max_rank", "run_with_deltas"]
