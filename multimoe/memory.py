"""What the shared pool saves: parameter bytes of the pool, of each tenant, and of the N sources."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def parameter_bytes(modules: list[nn.Module]) -> int:
    """Bytes of the distinct tensors `modules` store (parameters and persistent buffers, such as
    DeepSeek's router bias; a tied tensor counts once)."""
    seen = {}
    for module in modules:
        for tensor in module.state_dict(keep_vars=True).values():
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


@dataclass(frozen=True)
class MemoryReport:
    """Parameter bytes; `source_models_bytes` is what the tenants' original checkpoints hold together;
    `padding_bytes`, the part of `pool_bytes` that pads the pools for expert parallelism (entries
    no tenant reads, held only while loaded so); `delta_bytes`, the part of `tenant_bytes` that
    holds the tenants' low-rank expert deltas (`multimoe.expert_deltas`)."""

    pool_bytes: int
    tenant_bytes: dict[str, int]
    total_bytes: int
    source_models_bytes: int
    padding_bytes: int = 0
    delta_bytes: int = 0

    @property
    def saving(self) -> float:
        """Fraction of the sources' bytes that the multi-tenant model does not need."""
        return 1.0 - self.total_bytes / self.source_models_bytes

    @classmethod
    def of(cls, model: nn.Module) -> MemoryReport:
        """Measure a multi-tenant model from its registered parameters. A source model holds, in
        each sparse layer, E experts of the size of one pool entry."""
        config, decoder = model.config, model.model
        sparse = [layer for layer in decoder.layers if hasattr(layer, "experts")]
        pools = [layer.experts for layer in sparse]
        pool_bytes = parameter_bytes(pools)
        tenant_bytes = {name: parameter_bytes(list(model.tenant_modules(name).values())) for name in config.tenants}
        expert_bytes = parameter_bytes([pools[0]]) // sparse[0].pool_size  # every entry is one expert's size
        one_model_experts = len(pools) * config.num_routed_experts * expert_bytes
        delta_bytes = parameter_bytes([own for layer in sparse for own in layer.tenant_experts()])
        return cls(
            pool_bytes=pool_bytes,
            tenant_bytes=tenant_bytes,
            total_bytes=parameter_bytes([model]),
            source_models_bytes=sum(tenant_bytes.values()) - delta_bytes + len(tenant_bytes) * one_model_experts,
            padding_bytes=config.padding_entries() * expert_bytes,
            delta_bytes=delta_bytes,
        )

    def to_markdown(self) -> str:
        mib = 2**20
        rows = ["| part | MiB |", "|---|---:|", f"| shared expert pool | {self.pool_bytes / mib:.2f} |"]
        if self.padding_bytes:
            rows.append(f"| of which padding for expert parallelism | {self.padding_bytes / mib:.2f} |")
        rows += [f"| tenant `{name}` (own layers) | {size / mib:.2f} |" for name, size in self.tenant_bytes.items()]
        if self.delta_bytes:
            rows.append(f"| of which low-rank expert deltas, all tenants | {self.delta_bytes / mib:.2f} |")
        rows += [
            f"| **total** | **{self.total_bytes / mib:.2f}** |",
            f"| {len(self.tenant_bytes)} source models | {self.source_models_bytes / mib:.2f} |",
            f"| saving | {self.saving:.1%} |",
        ]
        return "\n".join(rows)


__all__ = ["MemoryReport"]
