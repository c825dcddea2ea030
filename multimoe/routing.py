"""Which rows of a batch run as which tenant: resolved once per forward, read by every layer.

A call names its tenant (`tenant="a"`), one tenant per row (`tenant_names=[...]`, or the same as
indices, `tenant_ids`), or nothing: then the tenant of the innermost `model.active(name)` block of
the calling thread or task applies, else the model's active tenant. Nothing here mutates the model,
so concurrent calls for different tenants cannot interfere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from itertools import accumulate
from typing import Union

import torch

RowFunction = Callable[[str, torch.Tensor], Union[torch.Tensor, tuple[torch.Tensor, ...]]]
GroupFunction = Callable[[str, torch.Tensor, Union[torch.Tensor, None]], Union[torch.Tensor, tuple]]

# id(model) -> tenant for the current thread / asyncio task; set by `model.active(name)`.
SCOPED_TENANTS: ContextVar[dict[int, str]] = ContextVar("multimoe_scoped_tenants", default={})
# id(model) -> the generation config of the `generate` call running in this thread / task.
CALL_GENERATION_CONFIGS: ContextVar[dict[int, object]] = ContextVar("multimoe_call_generation_configs", default={})
# The routing of the mixed-tenant forward running in this thread / task, read by the modules that
# stand for every tenant's own (see `multimoe.modeling.RowDispatch`).
MIXED_ROUTING: ContextVar["TenantRouting | None"] = ContextVar("multimoe_mixed_routing", default=None)


class UnknownTenantError(ValueError):
    """A tenant name that the model does not hold."""


class CacheTenantMismatchError(ValueError):
    """A KV cache built under some tenants was continued under others."""


@dataclass(frozen=True)
class TenantRouting:
    """The tenant of every row. `groups` pairs each tenant present with its rows as a slice of the
    batch put in tenant order (`order`; `None` when each tenant's rows already form one run), so a
    group is a free view and the per-group results rejoin with one `cat`. A batch that is all one
    tenant has a single group whose rows are `None` (no gathering at all)."""

    groups: tuple[tuple[str, slice | None], ...]
    row_tenants: tuple[str, ...]
    tenant_ids: torch.Tensor | None = None  # each row's index into the model's tenants (mixed batches)
    order: torch.Tensor | None = None  # batch row at each position of the tenant-ordered batch
    inverse: torch.Tensor | None = None  # position of each batch row in the tenant-ordered batch

    @classmethod
    def single(cls, name: str, batch_size: int) -> TenantRouting:
        return cls(((name, None),), (name,) * batch_size)

    @classmethod
    def from_ids(cls, tenant_ids: torch.Tensor, names: Sequence[str]) -> TenantRouting:
        ids = tenant_ids.tolist()
        row_tenants = tuple(names[index] for index in ids)
        counts = Counter(ids)  # tenants in order of first appearance
        if len(counts) == 1:
            return cls(((row_tenants[0], None),), row_tenants)
        ends = list(accumulate(counts.values()))
        groups = tuple((names[index], slice(end - counts[index], end)) for index, end in zip(counts, ends))
        order = tenant_order(ids)
        if order == list(range(len(order))):
            return cls(groups, row_tenants, tenant_ids)
        inverse = sorted(range(len(order)), key=order.__getitem__)
        order, inverse = (torch.tensor(rows, device=tenant_ids.device) for rows in (order, inverse))
        return cls(groups, row_tenants, tenant_ids, order, inverse)

    @property
    def is_mixed(self) -> bool:
        return len(self.groups) > 1

    def per_row(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each row's own tenant's copy of a small per-tenant tensor (`tensors` in the model's
        tenant order): [rows, ...]."""
        return torch.stack(tensors).index_select(0, self.tenant_ids)

    @property
    def tenant(self) -> str | None:
        """The one tenant of a batch that is all one tenant; `None` for a mixed batch."""
        return None if self.is_mixed else self.groups[0][0]

    @property
    def batch_size(self) -> int:
        return len(self.row_tenants)

    def batch_rows(self, span: slice) -> torch.Tensor:
        """The batch indices of one group's rows (`span` of the tenant-ordered batch)."""
        if self.order is not None:
            return self.order[span]
        return torch.arange(span.start, span.stop, device=self.tenant_ids.device)

    def map_rows(self, function: RowFunction, rows: torch.Tensor):
        """Apply `function(tenant, rows_of_that_tenant)` per group and reassemble the batch."""
        return self.map_groups(lambda name, group, batch_rows: function(name, group), rows)

    def map_groups(self, function: GroupFunction, rows: torch.Tensor):
        """Apply `function(tenant, its rows, their batch indices)` per group and reassemble the batch.

        `rows` has the batch, or the batch's tokens flattened row by row, as dim 0. `function` may
        return one tensor or a tuple (entries may be `None`), each with the batch's rows, or their
        tokens, on dim 0 (not necessarily as its input: DeepSeek's router flattens [rows, tokens]).
        """
        if not self.is_mixed:
            return function(self.groups[0][0], rows, None)

        def each_group(ordered: torch.Tensor, tokens: int):
            results = [
                function(name, ordered[span.start * tokens : span.stop * tokens], self.batch_rows(span))
                for name, span in self.groups
            ]
            several = isinstance(results[0], tuple)
            joined = [
                None if parts[0] is None else torch.cat(parts) for parts in (zip(*results) if several else [results])
            ]
            return tuple(joined) if several else joined[0]

        return self.in_tenant_order(each_group, rows)

    def in_tenant_order(self, function: Callable[[torch.Tensor, int], torch.Tensor | tuple], rows: torch.Tensor):
        """`function(rows in tenant order, tokens per row)`, each output put back in batch order: a
        batch whose tenants are interleaved is gathered once and each output scattered back once,
        whatever the number of tenants; one already in tenant order is passed as it is."""
        tokens, remainder = divmod(rows.shape[0], self.batch_size)
        if remainder or not tokens:
            raise ValueError(f"Expected {self.batch_size} rows (or their tokens) on dim 0, got {rows.shape[0]}.")
        if self.order is None:
            return function(rows, tokens)
        output = function(rows.index_select(0, token_positions(self.order, tokens)), tokens)

        def in_batch_order(part: torch.Tensor | None):  # by its own tokens per row (a router may flatten)
            if part is None:
                return None
            return part.index_select(0, token_positions(self.inverse, part.shape[0] // self.batch_size))

        return tuple(map(in_batch_order, output)) if isinstance(output, tuple) else in_batch_order(output)


def token_positions(rows: torch.Tensor, tokens: int) -> torch.Tensor:
    """The flattened token indices of `rows` when each row holds `tokens` tokens."""
    if tokens == 1:
        return rows
    return (rows[:, None] * tokens + torch.arange(tokens, device=rows.device)).flatten()


def tenant_order(row_tenants: Sequence[Hashable]) -> list[int]:
    """Row indices grouped by tenant, tenants in order of first appearance, rows in batch order
    within each: the order in which a mixed batch needs no gathering."""
    first_row = {}
    for row, tenant in enumerate(row_tenants):
        first_row.setdefault(tenant, row)
    return sorted(range(len(row_tenants)), key=lambda row: first_row[row_tenants[row]])


def claim_cache(cache, routing: TenantRouting) -> None:
    """Tag a cache with the tenant of each row on first use; refuse to continue it as others."""
    owners = getattr(cache, "multimoe_row_tenants", None)
    if owners is None or cache.get_seq_length() == 0:
        cache.multimoe_row_tenants = routing.row_tenants
        follow_row_edits(cache)
    elif owners != routing.row_tenants:
        raise CacheTenantMismatchError(
            f"This KV cache holds keys and values of tenants {list(owners)} (one per row); continuing it as "
            f"{list(routing.row_tenants)} would mix tenants. Start a new cache for a new tenant."
        )


# The cache methods that move, drop or repeat rows (beam search, serving engines); the tag follows.
ROW_EDITS = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave")


def follow_row_edits(cache) -> None:
    """Make the cache's own row edits move its tenant tag with the rows. Each is a `partial` on the
    instance, which pickles, and which a deep copy rebinds to the copy (its memo maps the cache)."""
    for method in ROW_EDITS:
        if method not in vars(cache) and hasattr(type(cache), method):
            setattr(cache, method, partial(edit_rows, cache, method=method))


def edit_rows(cache, argument, *, method: str) -> None:
    getattr(type(cache), method)(cache, argument)
    owners = cache.multimoe_row_tenants
    if method == "batch_repeat_interleave":
        cache.multimoe_row_tenants = tuple(owner for owner in owners for _ in range(argument))
        return
    rows = torch.as_tensor(argument)
    if rows.dtype == torch.bool:  # a mask, as tensor indexing takes it
        rows = rows.nonzero().flatten()
    cache.multimoe_row_tenants = tuple(owners[row] for row in rows.tolist())


__all__ = ["MIXED_ROUTING", "CacheTenantMismatchError", "TenantRouting", "UnknownTenantError", "claim_cache", "tenant_order", "token_positions"]
