"""Planning and computing per-tenant low-rank expert deltas (`consolidate(delta_rank=...)`).

A tenant whose expert joined a shared entry it differs from keeps the truncated SVD of the
difference of each matrix (its expert minus the entry), and the whole difference of each bias: the
best rank-r correction in Frobenius norm, computed without training (`multimoe.expert_deltas` runs
it). `"auto"` spends the memory budget on ranks where they buy the most: a candidate merge's
importance (its measured loss rise, or its squared distance) times the share of its weight
difference's energy each further rank captures, per byte, largest first.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..assembly import ExpertTensors
from ..expert_deltas import delta_names


def check_delta_rank(delta_rank: int | str | None) -> int | str | None:
    """`None` or 0 (no deltas), an int rank >= 1 for every merged expert, or `"auto"`."""
    if delta_rank is None or delta_rank == "auto":
        return None if delta_rank is None else "auto"
    if isinstance(delta_rank, bool) or not isinstance(delta_rank, int):
        raise TypeError(f"delta_rank must be None, an int >= 0 or 'auto', got {delta_rank!r}.")
    if delta_rank < 0:
        raise ValueError(f"delta_rank must be None, an int >= 0 or 'auto', got {delta_rank!r}.")
    return delta_rank or None


@dataclass(frozen=True)
class DeltaCost:
    """Bytes of deltas, from one expert's tensor shapes: each rank adds a row to both factors of
    every matrix whose full rank it does not exceed; an expert with a delta also keeps its whole
    bias differences."""

    matrices: tuple[tuple[int, int], ...]  # (m + n, full rank) of each matrix
    per_expert: int  # bias bytes
    itemsize: int

    @classmethod
    def of(cls, expert_shapes: Sequence[torch.Size], itemsize: int) -> DeltaCost:
        matrices = tuple((shape[0] + shape[1], min(shape)) for shape in expert_shapes if len(shape) == 2)
        per_expert = sum(math.prod(shape) for shape in expert_shapes if len(shape) != 2) * itemsize
        return cls(matrices, per_expert, itemsize)

    @property
    def max_rank(self) -> int:
        return max(cap for _, cap in self.matrices)

    def step(self, rank: int) -> int:
        """Bytes that raising a delta's rank from `rank - 1` to `rank` adds (its bias bytes apart)."""
        return sum(width for width, cap in self.matrices if cap >= rank) * self.itemsize

    def bytes(self, ranks: Sequence[int]) -> int:
        return sum(
            sum(min(rank, cap) * width for width, cap in self.matrices) * self.itemsize + self.per_expert
            for rank in ranks
            if rank
        )


def factors(difference: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The truncated SVD of `difference` [m, n] as `left` [r, m], `right` [r, n], with
    `left.T @ right` its best rank-r approximation; the singular values are split evenly between
    the two, so neither factor is tiny (bf16 storage, and recovery's gradients, treat them alike)."""
    u, s, vh = torch.linalg.svd(difference.float(), full_matrices=False)
    scale = s[:rank].sqrt()
    return (u[:, :rank] * scale).T, scale[:, None] * vh[:rank]


def energy_gains(difference: ExpertTensors, max_rank: int) -> torch.Tensor:
    """The share of the difference's squared Frobenius norm (its matrices together) that each
    further rank captures, [max_rank], decreasing."""
    matrices = [tensor.float() for tensor in difference if tensor.dim() == 2]
    total = sum(float(matrix.square().sum()) for matrix in matrices)
    if total == 0:
        return torch.zeros(max_rank)
    gains = torch.zeros(max_rank)
    for matrix in matrices:
        values = torch.linalg.svdvals(matrix).square()[:max_rank]
        gains[: len(values)] += values
    return gains / total


def layer_delta_state(
    names: Sequence[str], own: ExpertTensors, pool: Sequence[ExpertTensors], row: Sequence[int], ranks: Sequence[int]
) -> dict[str, torch.Tensor]:
    """One tenant's delta tensors of one layer (names relative to its experts module), for its
    stacked experts `own`, the layer's `pool` entries, its local -> entry map `row` and a rank per
    local expert; in the experts' dtype."""
    with_delta = [expert for expert, rank in enumerate(ranks) if rank]
    state = {}
    for index, name in enumerate(names):
        dtype = own[index].dtype
        differences = [own[index][expert].float() - pool[row[expert]][index].float() for expert in with_delta]
        if own[index].dim() == 3:
            cap = min(own[index].shape[1:])  # a rank beyond the matrix's own is its full rank
            pairs = [factors(difference, min(ranks[e], cap)) for difference, e in zip(differences, with_delta)]
            left, right = delta_names(name, True)
            state[left] = torch.cat([pair[0] for pair in pairs]).to(dtype)
            state[right] = torch.cat([pair[1] for pair in pairs]).to(dtype)
        else:
            state[delta_names(name, False)[0]] = torch.stack(differences).to(dtype)
    return state


def auto_ranks(
    importance: Sequence[float], gains: Sequence[torch.Tensor], bytes_left: int, cost: DeltaCost
) -> tuple[list[int], float]:
    """Ranks for candidates of `importance` whose differences' energy gains per rank are `gains`,
    within `bytes_left`, greedily: the next rank step with the largest importance x gain per byte
    first (a candidate's first step also costs its bias differences). Returns the ranks and the
    importance they recover, by the estimate."""
    ranks = [0] * len(importance)

    def next_step(index: int) -> tuple[float, float, int]:
        rank = ranks[index] + 1
        value = importance[index] * float(gains[index][rank - 1])
        price = cost.step(rank) + (0 if ranks[index] else cost.per_expert)
        return -value / price, value, price

    heap = [(*next_step(index), index) for index in range(len(importance))]
    heapq.heapify(heap)
    recovered = 0.0
    while heap:
        _, value, price, index = heapq.heappop(heap)
        if value <= 0:
            break
        if price > bytes_left:
            continue  # this candidate's next step does not fit; a cheaper one may
        ranks[index] += 1
        bytes_left -= price
        recovered += value
        if ranks[index] < min(len(gains[index]), cost.max_rank):
            heapq.heappush(heap, (*next_step(index), index))
    return ranks, recovered


__all__ = ["DeltaCost", "auto_ranks", "check_delta_rank", "energy_gains", "factors", "layer_delta_state"]
