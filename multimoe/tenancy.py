"""Adding and removing tenants of a built model, in place, without touching the others' outputs.

Adding only appends pool entries and registers new modules; removing drops the tenant's modules
and the pool entries nobody else reads, then renumbers the survivors' maps to the same experts.
Either way every other tenant computes with bit-identical weights. Every check runs before the
model is modified.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.utils.output_capturing import OutputRecorder, recursively_install_hooks

from .assembly import SHARED_SETTINGS, TenantSet, delta_state
from .checkpoints import IncompatibleTenantsError, TenantCheckpoint, TenantSource, check_compatible
from .configuration import validate_tenant_name
from .consolidation.deltas import check_delta_rank, layer_delta_state
from .consolidation.merging import identical
from .consolidation.similarity import NEEDS_CALIBRATION, expert_runner, get_metric
from .expert_deltas import max_rank
from .modeling import MultiTenantDecoderLayer, MultiTenantLM
from .validation import check_number


def match_to_pool(distances: torch.Tensor, threshold: float) -> list[int | None]:
    """For each new expert, a pool entry within `threshold` (closest pairs first, each entry used
    at most once by this tenant), or None for a new entry."""
    matches: list[int | None] = [None] * distances.shape[0]
    taken: set[int] = set()
    for flat in torch.argsort(distances.flatten()).tolist():
        expert, entry = divmod(flat, distances.shape[1])
        if distances[expert, entry] > threshold:
            break
        if matches[expert] is None and entry not in taken:
            matches[expert] = entry
            taken.add(entry)
    return matches


def install_output_hooks(model: MultiTenantLM, modules: dict[str, nn.Module]) -> None:
    """Give new modules the output-capturing hooks the model already installed on the others
    (transformers installs them once, on first use, for the modules present then)."""
    decoder = model.model
    if not getattr(decoder, "_output_capturing_hooks_installed", False):
        return
    tasks = [
        (key, spec if isinstance(spec, OutputRecorder) else OutputRecorder(target_class=spec, index=1))
        for key, spec in decoder._can_record_outputs.items()
        if key != "hidden_states"  # recorded on whole layers, which do not change
    ]
    for name, module in modules.items():
        recursively_install_hooks(module, name, tasks)


def check_whole(model: MultiTenantLM, edit: str) -> None:
    """Refuse to edit a model split over ranks (tensor, expert or FSDP2 parallel), or loaded with its
    pools padded for that: each rank holds a share of the tensors an edit rewrites, and an edit
    would put new entries where the padding is."""
    split = any(isinstance(parameter, DTensor) for parameter in model.parameters())
    if split or model.config.pool_multiple > 1:
        raise ValueError(
            f"Cannot {edit}: the model is split over several ranks or padded for that. Edit it as loaded on one "
            "process, save it, and load the result with your DistributedConfig."
        )


def add_tenant(
    model: MultiTenantLM,
    name: str,
    source: TenantSource,
    *,
    similarity: str = "weight_l2",
    threshold: float = 0.0,
    delta_rank: int | None = None,
    revision: str | None = None,
) -> None:
    validate_tenant_name(name)
    check_whole(model, f"add tenant {name!r}")
    check_number("threshold", threshold, unbounded=True)  # math.inf: every expert shares its closest entry
    if check_delta_rank(delta_rank) == "auto":
        raise ValueError(
            "add_tenant takes an int delta_rank: 'auto' spends a memory_budget, which only consolidate() has."
        )
    delta_rank = check_delta_rank(delta_rank)
    if name in model.tenants:
        raise ValueError(f"Tenant {name!r} already exists; remove it first to replace it.")
    if similarity in NEEDS_CALIBRATION:
        raise ValueError(f"add_tenant compares weights; {similarity!r} needs calibration, use consolidate().")
    metric = get_metric(similarity)
    checkpoint = TenantCheckpoint.open(source, tenant=name, revision=revision)
    config = model.config
    if checkpoint.family is not config.family:
        raise IncompatibleTenantsError(
            f"Tenant {name!r} is a {checkpoint.family.model_type!r} model; this model serves "
            f"{config.family.model_type!r} tenants."
        )
    check_compatible({model.tenants[0]: config.family_config(), name: checkpoint.config})
    differing = [
        key for key in SHARED_SETTINGS if getattr(checkpoint.config, key, None) != getattr(config, key, None)
    ]
    if differing:
        own = {key: getattr(checkpoint.config, key) for key in differing}
        applied = {key: getattr(config, key) for key in differing}
        raise IncompatibleTenantsError(
            f"Tenant {name!r} has {own}, while the model applies {applied} to every tenant; set the source's config "
            "to the model's values to add it."
        )
    if checkpoint.dtype != model.dtype:
        raise IncompatibleTenantsError(
            f"Tenant {name!r} holds {checkpoint.dtype} weights and the model {model.dtype} ones; convert the source "
            f"first (e.g. source.to({model.dtype})) so that no cast happens unseen."
        )
    incoming = TenantSet({name: checkpoint}, None, model.dtype)
    own_tensors = incoming.non_expert_tensors(name)  # read and checked before anything changes

    device, family = model.device, config.family
    run_experts = expert_runner(config.family, config)
    names = family.expert_parameter_names(config)
    experts_modules = family.experts_modules(config)
    expert_map, delta_ranks, additions = [], [], []
    for layer_idx, layer in enumerate(model.model.layers):
        if not config.pool_sizes[layer_idx]:  # a dense layer
            expert_map.append([])
            delta_ranks.append([])
            additions.append(None)
            continue
        experts = incoming.layer_experts(layer_idx)[name]
        pool = tuple(tensor.detach().cpu() for tensor in family.stacked_experts(config, layer.experts))
        matches = match_to_pool(metric(experts, pool, None, run_experts), threshold)
        new = [expert for expert, entry in enumerate(matches) if entry is None]
        row = list(matches)
        for offset, expert in enumerate(new):
            row[expert] = config.pool_sizes[layer_idx] + offset
        expert_map.append(row)
        additions.append(tuple(tensor[new] for tensor in experts))
        # A delta for each expert that shares an entry it differs from.
        entries = [tuple(tensor[entry] for tensor in pool) for entry in range(len(pool[0]))]
        ranks = [
            min(delta_rank, max_rank(family.expert_shapes(layer.experts)))
            if delta_rank and entry is not None and not identical([tuple(t[expert] for t in experts), entries[entry]])
            else 0
            for expert, entry in enumerate(matches)
        ]
        delta_ranks.append(ranks)
        if any(ranks):
            state = layer_delta_state(names, experts, entries, [e or 0 for e in matches], ranks)
            own_tensors.update(delta_state(family, experts_modules[layer_idx], name, incoming.layer_paths, state))

    # Nothing above modified the model; from here on it changes.
    config.pool_sizes = [size + (len(extra[0]) if extra else 0) for size, extra in zip(config.pool_sizes, additions)]
    config.tenants[name] = {
        "expert_map": expert_map,
        "tie_word_embeddings": checkpoint.tie_word_embeddings,
        "pad_token_id": checkpoint.config.pad_token_id,
        "source": checkpoint.label,
    }
    if any(any(row) for row in delta_ranks):
        config.tenants[name]["delta_ranks"] = delta_ranks
    for layer, extra in zip(model.model.layers, additions):
        if extra is not None and len(extra[0]):
            stacked = family.stacked_experts(config, layer.experts)
            store_pool(layer, tuple(torch.cat([old.data, new.to(device)]) for old, new in zip(stacked, extra)))
    model.add_tenant_modules(name)
    model.take_tenant_files(incoming)  # read when opened and by TenantSet above
    modules = model.tenant_modules(name)
    for module in modules.values():
        module.to(device=device, dtype=model.dtype).train(model.training)  # new modules start in training mode
    with torch.no_grad():
        for key, tensor in own_tensors.items():
            model.get_parameter_or_buffer(key).copy_(tensor)
    model.tie_weights()  # the new tenant's tied names (see `_tied_weights_keys`) read its embedding
    install_output_hooks(model, modules)
    model.build_views()


def remove_tenant(model: MultiTenantLM, name: str) -> None:
    name = model.model.known_tenant(name)
    check_whole(model, f"remove tenant {name!r}")
    if len(model.tenants) == 1:
        raise ValueError(f"Cannot remove {name!r}: it is the only tenant.")
    config = model.config
    survivors = [tenant for tenant in model.tenants if tenant != name]
    for layer_idx, layer in enumerate(model.model.layers):
        if config.pool_sizes[layer_idx]:
            remove_pool_entries(layer, layer_idx, config, survivors)
    for key in model.tenant_modules(name):
        owner, _, tenant = key.rpartition(".")
        del model.get_submodule(owner)[tenant]
    del model.generation_configs[name]
    model.tenant_tokenizers.pop(name, None)
    del config.tenants[name]
    if config.default_tenant == name:
        config.default_tenant = survivors[0]
    if model.model.active_tenant == name:
        model.model.active_tenant = config.default_tenant
    for layer in model.modules():
        if isinstance(layer, MultiTenantDecoderLayer):
            release_shared_storage(layer.tenants)
    model.build_views()  # lays the grouped projections out again, in storages of the survivors alone


def release_shared_storage(modules: nn.Module) -> None:
    """Give each tensor of `modules` that is a slice of a larger storage (the assembly stores a
    layer's tensors of all tenants side by side) a storage of its own: a removed tenant's slice is
    freed only once nothing views its storage."""
    with torch.no_grad():
        for module in modules.modules():
            for tensors in (module._parameters, module._buffers):
                for key, tensor in tensors.items():
                    if tensor is None or tensor.is_meta or tensor.untyped_storage().nbytes() <= tensor.nbytes:
                        continue
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = tensor.data.clone()
                    else:
                        tensors[key] = tensor.clone()


def remove_pool_entries(layer, layer_idx: int, config, survivors: list[str]) -> None:
    """Drop the layer's pool entries no survivor reads and renumber the survivors' maps to the same experts."""
    kept = sorted({entry for tenant in survivors for entry in config.expert_map(tenant, layer_idx)})
    renumber = {old: new for new, old in enumerate(kept)}
    if len(kept) < config.pool_sizes[layer_idx]:
        stacked = config.family.stacked_experts(config, layer.experts)
        index = torch.tensor(kept, device=stacked[0].device)
        store_pool(layer, tuple(tensor.data.index_select(0, index) for tensor in stacked))
    for tenant in survivors:
        row = [renumber[entry] for entry in config.tenants[tenant]["expert_map"][layer_idx]]
        config.tenants[tenant]["expert_map"][layer_idx] = row
        layer.tenants[tenant].get_submodule(layer.experts_path).expert_map.copy_(torch.tensor(row))
    config.pool_sizes[layer_idx] = len(kept)


def store_pool(layer, stacked: tuple[torch.Tensor, ...]) -> None:
    """Make `stacked` the layer's pool entries: the family's experts module, sized to them, holding
    them as its parameters (trainable, and in the mode, of the pool it replaces)."""
    config, old = layer.config, layer.experts
    with torch.device("meta"):
        pool = config.family.pool(config, stacked[0].shape[0])
    pool.load_state_dict(config.family.experts_state(config, stacked), assign=True)
    layer.experts = pool.requires_grad_(next(old.parameters()).requires_grad).train(old.training)


__all__ = ["add_tenant", "remove_tenant"]
