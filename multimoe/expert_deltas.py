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
computed per tenant in two products (each row keeping its own expert's rank components): the
segmented low-rank product of S-LoRA and Punica.
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

    def corrections(self, name: str, bias: str | None, inputs: torch.Tensor, experts: torch.Tensor, transposed: bool):
        """What this tenant's deltas add to the product of expert matrix `name` (and its `bias`)
        with `inputs` [S, n], one row per pick of local expert `experts` [S]: the rank components of
        the experts the picks reach at once, each row keeping its own expert's (an expert without a
        delta adds 0). Two products per tenant, whatever the number of experts its rows reach."""
        cap, ranks = self.caps[name], self.layout.ranks
        reached = [expert for expert in torch.unique(experts).tolist() if ranks[expert]]
        left, right = (getattr(self, key) for key in delta_names(name, True))
        if not reached:  # the product's width: m of the matrix [m, n] (n where it is stored transposed)
            return inputs.new_zeros(inputs.shape[0], (right if transposed else left).shape[1])
        if 2 * len(reached) < sum(1 for rank in ranks if rank):  # few reached (decode): read only theirs
            spans = [self.layout.span(expert, cap) for expert in reached]
            components = torch.cat([torch.arange(span.start, span.stop) for span in spans]).to(experts.device)
            left, right = left.index_select(0, components), right.index_select(0, components)
            widths = [span.stop - span.start for span in spans]
        else:
            reached, widths = list(range(len(ranks))), [min(rank, cap) for rank in ranks]
        component_expert = torch.repeat_interleave(
            torch.tensor(reached, device=experts.device), torch.tensor(widths, device=experts.device)
        )
        own = (component_expert[None, :] == experts[:, None]).to(inputs.dtype)  # [S, components]
        # The matrix is left.T @ right [m, n]: y = x W.T (stored [out, in]) or y = x W (transposed).
        first, second = (left, right) if transposed else (right, left)
        output = ((inputs @ first.T) * own) @ second
        if bias is not None:
            deltas = getattr(self, delta_names(bias, False)[0])
            rows = torch.tensor(
                [self.layout.row(expert) if rank else len(deltas) for expert, rank in enumerate(ranks)],
                device=experts.device,
            )
            output = output + torch.cat([deltas, deltas.new_zeros(1, deltas.shape[1])])[rows[experts]]
        return output


def segments(keys: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """`keys` sorted (stably): the order, each distinct key and its count, in sorted order."""
    order = torch.argsort(keys, stable=True)
    values, counts = torch.unique_consecutive(keys[order], return_counts=True)
    return order, values.tolist(), counts.tolist()


def run_with_deltas(
    pool: nn.Module,
    program,
    hidden_states: torch.Tensor,
    slots: tuple[torch.Tensor, ...],
    owners: list[ExpertDeltas],
) -> torch.Tensor:
    """The pool's output for `slots` (per pick of a token: the token, its pool entry, its routing
    weight, its tenant's index into `owners` and its local expert), each pick corrected by its
    tenant's delta of its local expert, where it has one.

    The products run entry by entry over the picks sorted by entry (as the family's kernels group
    them); then each tenant's picks add their low-rank products (`ExpertDeltas.corrections`).
    `program` (the family's `ExpertProgram`) says which tensors the products use and what runs
    between them."""
    order, entries, counts = segments(slots[1])
    token, _, weight, owner, local = (tensor[order] for tensor in slots)
    by_owner, present, owner_counts = segments(owner)
    groups = [
        (owners[index], rows)
        for index, rows in zip(present, by_owner.split(owner_counts))
        if owners[index].has_deltas
    ]

    def project(inputs: torch.Tensor, name: str, bias: str | None) -> torch.Tensor:
        pieces = []
        for pool_entry, rows in zip(entries, inputs.split(counts)):
            output = program.product(pool, name, pool_entry, rows)
            if bias is not None:
                output = output + program.tensor(pool, bias, pool_entry)
            pieces.append(output)
        output = torch.cat(pieces)
        for deltas, rows in groups:
            correction = deltas.corrections(name, bias, inputs[rows], local[rows], program.transposed)
            output = output.index_add(0, rows, correction.to(output.dtype))
        return output

    hidden = project(hidden_states[token], program.first, program.first_bias)
    hidden = program.between(pool, hidden)
    output = project(hidden, program.second, program.second_bias) * weight[:, None]
    return torch.zeros_like(hidden_states).index_add(0, token, output.to(hidden_states.dtype))


__all__ = ["DeltaLayout", "ExpertDeltas", "delta_names", "max_rank", "run_with_deltas"]
