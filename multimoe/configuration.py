"""Multi-tenant configs: one family config shared by every tenant, plus the tenant maps.

The config is the single source of shape truth: the pool size of each layer and, for every
tenant and layer, which pool entry each of the tenant's local experts reads. Everything else is a
plain field of the family's own config (`MixtralConfig`, `Qwen3MoeConfig`, ...) and passes through
untouched. One config class per registered family (see `multimoe.families`), named after it:
`MultiTenantMixtralConfig`, `MultiTenantQwen3MoeConfig`, ...
"""

from __future__ import annotations

import re
from typing import Any

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig

from .families import FAMILIES, Family, routed_experts

TENANT_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def is_index(value: object) -> bool:
    """An int from JSON, and not a bool: `true` would otherwise pass as expert 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def validate_tenant_name(name: object) -> str:
    """Tenant names become module keys and file-name parts, so they must be plain identifiers."""
    if not isinstance(name, str) or not TENANT_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"Invalid tenant name {name!r}: use letters, digits, '_' and '-', starting with a letter or digit."
        )
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"Invalid tenant name {name!r}: it clashes with a torch.nn.ModuleDict attribute.")
    return name


def tenants_from_entries(entries: list) -> dict[str, dict]:
    """The tenants mapping, in list order, from config.json's list of entries."""
    tenants = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"Each entry of tenants must be an object with a 'name', got {entry!r}.")
        spec = dict(entry)
        name = spec.pop("name")
        if name in tenants:
            raise ValueError(f"Tenant {name!r} is listed more than once in tenants.")
        tenants[name] = spec
    return tenants


class MultiTenantConfigMixin:
    r"""
    The tenant fields of a multi-tenant config, on top of every field of the family's config:

    tenants (`dict[str, dict]`):
        One entry per tenant, in the tenants' order (a row's `tenant_ids` index into it). Each entry
        holds `expert_map`, a list with one list per layer mapping the tenant's local expert index
        to a pool index (empty for a dense layer); `tie_word_embeddings`, whether this tenant's
        lm_head shares its embedding matrix; `pad_token_id`, its embedding's padding token (the
        model's when absent, as in earlier releases); and `source`, where the tenant came from
        (informational, may be `None`); and, where the tenant keeps low-rank expert deltas
        (`multimoe.expert_deltas`), `delta_ranks`, shaped like `expert_map`: the rank of each local
        expert's delta (0: none; absent: no deltas). config.json stores it as a list of entries with a `name`
        each, because transformers writes JSON with sorted keys, which would reorder a mapping;
        the mapping form of earlier releases still loads, in its stored order.
    default_tenant (`str`):
        The tenant a forward uses when none is named and none was activated.
    pool_sizes (`list[int]`):
        The number of shared experts stored in each layer (0 for a dense layer).

    `pool_multiple`, set only while loading for expert parallelism and never saved, pads each pool
    with entries no map points to, up to a multiple of the expert-parallel ranks (see
    `padded_pool_size`).

    Tying is decided per tenant; the inherited `tie_word_embeddings` field is not used.
    """

    family_type: str  # the model_type of the tenants' family

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.tenants is None:
            self.tenants = {}
        if isinstance(self.tenants, list):
            self.tenants = tenants_from_entries(self.tenants)
        if not isinstance(self.tenants, dict):
            raise ValueError(f"tenants must map tenant names to their specs, got {type(self.tenants).__name__}.")
        if self.tenants:
            self.check_tenant_maps()

    def to_dict(self) -> dict:
        fields = super().to_dict()
        fields.pop("pool_multiple", None)  # a property of this load, not of the checkpoint
        fields["tenants"] = [{"name": name} | spec for name, spec in self.tenants.items()]
        return fields

    @property
    def family(self) -> Family:
        return FAMILIES[self.family_type]

    # The family's parallel plans, for the multi-tenant layout (see `Family.multitenant_plan`): each
    # tenant's attention is split as the family splits its own, the pool as the family's experts.
    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        return self.family.multitenant_plan(self.family.config_class.base_model_tp_plan, self.tenants)

    @property
    def base_model_ep_plan(self) -> dict[str, str]:
        return self.family.multitenant_plan(self.family.config_class.base_model_ep_plan, self.tenants)

    @property
    def base_model_fsdp_plan(self) -> dict[str, str]:
        # Only the multi-tenant layers are FSDP units. A unit per tenant (its embedding, norm, head)
        # would make each rank's collectives follow the tenants its rows name, which differ between
        # ranks, and pair one tenant's gradients with another's; left to the root unit, they are
        # gathered once per forward on every rank alike.
        plan = self.family.config_class.base_model_fsdp_plan or {}
        layers = {key: style for key, style in plan.items() if key.startswith("layers.")}
        return self.family.multitenant_plan(layers, self.tenants)

    pool_multiple = 1

    def padded_pool_size(self, layer_idx: int) -> int:
        """Entries the pool of layer `layer_idx` holds once loaded: `pool_sizes[layer_idx]` rounded up
        to a multiple of `pool_multiple` (transformers splits experts over ranks evenly only). The
        padding entries are zeros that no map points to, so no row reaches them."""
        return -(-self.pool_sizes[layer_idx] // self.pool_multiple) * self.pool_multiple

    def padding_entries(self) -> int:
        return sum(self.padded_pool_size(layer_idx) - size for layer_idx, size in enumerate(self.pool_sizes))

    @property
    def num_routed_experts(self) -> int:
        """E, the number of local experts each tenant routes among."""
        return routed_experts(self)

    @property
    def tenant_names(self) -> list[str]:
        return list(self.tenants)

    def family_config(self) -> PreTrainedConfig:
        """The family's own config with this config's shared fields: what a tenant's config is
        compared with (`multimoe.checkpoints.check_compatible`)."""
        fields = self.to_dict()
        for field in ("tenants", "default_tenant", "pool_sizes", "model_type", "auto_map", "architectures"):
            fields.pop(field, None)
        return self.family.config_class(**fields)

    def expert_map(self, tenant: str, layer_idx: int) -> list[int]:
        return self.tenants[tenant]["expert_map"][layer_idx]

    def delta_ranks(self, tenant: str, layer_idx: int) -> list[int]:
        """The rank of each of the tenant's local experts' deltas in layer `layer_idx` (0: none)."""
        ranks = self.tenants[tenant].get("delta_ranks")
        return ranks[layer_idx] if ranks is not None else [0] * len(self.expert_map(tenant, layer_idx))

    def check_tenant_maps(self) -> None:
        """Reject maps that would index past the pool, before any module is built from them."""
        layers, experts = len(self.family.layer_paths(self)), self.num_routed_experts
        pool_sizes = self.pool_sizes
        if not isinstance(pool_sizes, list) or len(pool_sizes) != layers:
            raise ValueError(f"pool_sizes must list one size per layer ({layers}), got {pool_sizes!r}.")
        for layer_idx, size in enumerate(pool_sizes):
            if not is_index(size) or size < 0:
                raise ValueError(f"pool_sizes[{layer_idx}] must be an int >= 0, got {size!r}.")
        for name, spec in self.tenants.items():
            validate_tenant_name(name)
            expert_map = spec.get("expert_map") if isinstance(spec, dict) else None
            if not isinstance(expert_map, list) or len(expert_map) != layers:
                raise ValueError(f"Tenant {name!r}: expert_map must have one row per layer ({layers}).")
            pad = spec.get("pad_token_id")
            if pad is not None and not (is_index(pad) and 0 <= pad < self.vocab_size):
                raise ValueError(f"Tenant {name!r}: pad_token_id {pad!r} is not a token id below {self.vocab_size}.")
            for layer_idx, row in enumerate(expert_map):
                width = experts if pool_sizes[layer_idx] else 0
                if not isinstance(row, list) or len(row) != width:
                    raise ValueError(
                        f"Tenant {name!r}, layer {layer_idx}: expert_map row must list {width} pool indices, "
                        f"got {row!r}."
                    )
                for pool_idx in row:
                    if not is_index(pool_idx):
                        raise ValueError(f"Tenant {name!r}, layer {layer_idx}: pool index {pool_idx!r} is not an int.")
                    if not 0 <= pool_idx < pool_sizes[layer_idx]:
                        raise ValueError(
                            f"Tenant {name!r}, layer {layer_idx}: pool index {pool_idx!r} is outside the pool "
                            f"of {pool_sizes[layer_idx]} experts."
                        )
            self.check_delta_ranks(name, spec.get("delta_ranks"))
        if self.default_tenant not in self.tenants:
            raise ValueError(
                f"default_tenant {self.default_tenant!r} is not one of the tenants {self.tenant_names}."
            )

    def check_delta_ranks(self, name: str, ranks: object) -> None:
        """`delta_ranks`, where given, must be shaped like the tenant's `expert_map` and hold ints >= 0."""
        if ranks is None:
            return
        expert_map = self.tenants[name]["expert_map"]
        if not isinstance(ranks, list) or len(ranks) != len(expert_map):
            raise ValueError(f"Tenant {name!r}: delta_ranks must have one row per layer ({len(expert_map)}).")
        for layer_idx, (row, experts) in enumerate(zip(ranks, expert_map)):
            if not isinstance(row, list) or len(row) != len(experts) or not all(is_index(r) and r >= 0 for r in row):
                raise ValueError(
                    f"Tenant {name!r}, layer {layer_idx}: delta_ranks row must list {len(experts)} ranks (ints >= 0), "
                    f"got {row!r}."
                )


def multitenant_config_class(family: Family) -> type[PreTrainedConfig]:
    """`MultiTenant<Stem>Config`: the family's config class plus the tenant fields."""
    name = f"MultiTenant{family.class_stem}Config"
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"Configuration of a multi-tenant {family.class_stem} model: every `{family.config_class.__name__}` "
        f"field, plus the tenant fields.\n{MultiTenantConfigMixin.__doc__}",
        "model_type": family.multitenant_model_type,
        "family_type": family.model_type,
        # Checked by `check_tenant_maps`, with messages naming the tenant and layer at fault.
        "__annotations__": {"tenants": Any, "default_tenant": str | None, "pool_sizes": Any},
        "tenants": None,
        "default_tenant": None,
        "pool_sizes": None,
    }
    return strict(type(name, (MultiTenantConfigMixin, family.config_class), namespace))


# One class per registered family, defined at module level: checkpoints name them in `auto_map`.
CONFIG_CLASSES: dict[str, type[PreTrainedConfig]] = {}


def config_class_for(family: Family) -> type[PreTrainedConfig]:
    """The multi-tenant config class of `family`, made once and kept as a module attribute (the
    name a checkpoint's `auto_map` gives)."""
    if family.model_type not in CONFIG_CLASSES:
        config_class = CONFIG_CLASSES[family.model_type] = multitenant_config_class(family)
        globals()[config_class.__name__] = config_class
    return CONFIG_CLASSES[family.model_type]


for _family in list(FAMILIES.values()):
    config_class_for(_family)
del _family
MultiTenantMixtralConfig = CONFIG_CLASSES["mixtral"]


__all__ = ["CONFIG_CLASSES", "config_class_for", "MultiTenantConfigMixin", "MultiTenantMixtralConfig", "multitenant_config_class", "validate_tenant_name"]
