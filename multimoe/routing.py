"""Which rows of a batch run as which tenant: resolved once per forward, read by every layer.

A call names its tenant (`tenant="a"`), one tenant per row (`tenant_names=[...]`, or the same as
indices, `tenant_ids`), or nothing: then the tenant of the innermost `model.active(name)` block of
the calling thread or task applies, else the model's active tenant. Nothing here mutates the model,
so concurrent calls for different tenants cannot interfere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Union

import torch

RowFunction = Callable[[str, torch.Tensor], Union[torch.Tensor, tuple[torch.Tensor, ...]]]

# id(model) -> tenant for the current thread / asyncio task; set by `model.active(name)`.
SCOPED_TENANTS: ContextVar[dict[int, str]] = ContextVar("multimoe_scoped_tenants", default={})


class UnknownTenantError(ValueError):
    """A tenant name that the model does not hold."""


class CacheTenantMismatchError(ValueError):
    """A KV cache built under some tenants was continued under others."""


@dataclass(frozen=True)
class TenantRouting:
    """The tenant of every row. `groups` pairs each tenant present with its row indices; a batch
    that is all one tenant has a single group whose rows are `None` (no gathering at all)."""

    groups: tuple[tuple[str, torch.Tensor | None], ...]
    row_tenants: tuple[str, ...]
    tenant_ids: torch.Tensor | None = None  # each row's index into the model's tenants (mixed batches)

    @classmethod
    def single(cls, name: str, batch_size: int) -> TenantRouting:
        return cls(((name, None),), (name,) * batch_size)

    @classmethod
    def from_ids(cls, tenant_ids: torch.Tensor, names: Sequence[str]) -> TenantRouting:
        ids = tenant_ids.tolist()
        row_tenants = tuple(names[index] for index in ids)
        present = sorted(set(ids))
        if len(present) == 1:
            return cls(((names[present[0]], None),), row_tenants)
        groups = tuple((names[index], (tenant_ids == index).nonzero().squeeze(1)) for index in present)
        return cls(groups, row_tenants, tenant_ids)

    @property
    def is_mixed(self) -> bool:
        return len(self.groups) > 1

    def map_rows(self, function: RowFunction, rows: torch.Tensor):
        """Apply `function(tenant, rows_of_that_tenant)` per group and reassemble the batch.

        `function` may return one tensor or a tuple of tensors, each with the batch as dim 0.
        """
        if not self.is_mixed:
            return function(self.groups[0][0], rows)
        outputs = None
        for name, indices in self.groups:
            result = function(name, rows.index_select(0, indices))
            parts = result if isinstance(result, tuple) else (result,)
            if outputs is None:
                outputs = [part.new_empty((rows.shape[0], *part.shape[1:])) for part in parts]
            for output, part in zip(outputs, parts):
                output.index_copy_(0, indices, part)
        return tuple(outputs) if isinstance(result, tuple) else outputs[0]


def claim_cache(cache, routing: TenantRouting) -> None:
    """Tag a cache with the tenant of each row on first use; refuse to continue it as others."""
    owners = getattr(cache, "multimoe_row_tenants", None)
    if owners is None or cache.get_seq_length() == 0:
        cache.multimoe_row_tenants = routing.row_tenants
    elif owners != routing.row_tenants:
        raise CacheTenantMismatchError(
            f"This KV cache holds keys and values of tenants {list(owners)} (one per row); continuing it as "
            f"{list(routing.row_tenants)} would mix tenants. Start a new cache for a new tenant."
        )


__all__ = ["CacheTenantMismatchError", "TenantRouting", "UnknownTenantError", "claim_cache"]
