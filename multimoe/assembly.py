"""Assembling a multi-tenant state dict and config from N fine-tunes of one MoE family.

The lossless assembly stores an expert once when it is bit-identical (after the cast to the target
dtype) to one already in the same layer's pool; a pool entry serves at most one local expert of
each tenant. Everything is read and checked tensor by tensor, layer by layer.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Mapping

import torch
from transformers import PreTrainedConfig

from .checkpoints import (
    CheckpointError,
    IncompatibleTenantsError,
    TenantCheckpoint,
    TenantSource,
    check_compatible,
    is_finite,
    one_device,
)
from .configuration import MultiTenantConfigMixin, config_class_for, validate_tenant_name
from .families import Family
from .validation import check_number

# One expert's (or a layer's stacked experts') tensors, in the family's fused layout order
# (e.g. gate_up_proj, down_proj; gpt-oss adds their biases).
ExpertTensors = tuple[torch.Tensor, ...]


def open_checkpoints(
    models: Mapping[str, TenantSource], revision: str | None, family: Family | None = None
) -> dict[str, TenantCheckpoint]:
    if not isinstance(models, Mapping) or not models:
        raise ValueError("Give at least one tenant, as a mapping {tenant name: model, directory or Hub id}.")
    pairs = list(models.items())
    seen: set[str] = set()
    for name, _ in pairs:
        validate_tenant_name(name)
        if name in seen:  # a multi-valued Mapping (e.g. a MultiDict) would otherwise drop all but the last source
            raise ValueError(f"Tenant name {name!r} is given more than once.")
        seen.add(name)
    checkpoints = {name: TenantCheckpoint.open(source, tenant=name, revision=revision) for name, source in pairs}
    for name, checkpoint in checkpoints.items():
        if family is not None and checkpoint.family is not family:
            raise IncompatibleTenantsError(
                f"Tenant {name!r} is a {checkpoint.family.model_type!r} model; this class serves "
                f"{family.model_type!r} tenants (multimoe.from_models picks the class from the sources)."
            )
    check_compatible({name: checkpoint.config for name, checkpoint in checkpoints.items()})
    return checkpoints


def expected_shapes(checkpoint: TenantCheckpoint) -> dict[str, torch.Size]:
    """Parameter shapes of the family's own model with this config, measured on the meta device,
    under the names multimoe reads them by (a per-expert family's experts stacked)."""
    family, config = checkpoint.family, checkpoint.config
    with torch.device("meta"):
        reference = family.model_class(config)
    shapes = {}
    for name, tensor in reference.state_dict().items():
        stacked = family.stacked_name(config, name)
        shapes[stacked] = tensor.shape if stacked == name else torch.Size([checkpoint.num_experts, *tensor.shape])
    return shapes


def checked(tensor: torch.Tensor, *, tenant: str, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The tensor in `dtype` on the CPU, after shape and finiteness checks that name it on failure."""
    if tensor.shape != shape:
        raise CheckpointError(f"Tenant {tenant!r}: {name} has shape {list(tensor.shape)}, expected {list(shape)}.")
    if not tensor.is_floating_point():
        raise CheckpointError(f"Tenant {tenant!r}: {name} has dtype {tensor.dtype}, expected a floating dtype.")
    tensor = tensor.detach().to(device="cpu", dtype=dtype)
    if not is_finite(tensor):
        raise CheckpointError(f"Tenant {tenant!r}: {name} contains NaN or Inf values.")
    return tensor.contiguous()


def fingerprint(*tensors: torch.Tensor) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.digest()


def identical_expert_pool(
    layer_experts: Mapping[str, ExpertTensors],
) -> tuple[list[ExpertTensors], dict[str, list[int]]]:
    """Pool entries and per-tenant local -> pool maps, sharing only bit-identical experts."""
    pool: list[ExpertTensors] = []
    entries_by_fingerprint: dict[bytes, list[int]] = {}
    maps: dict[str, list[int]] = {}
    for tenant, tensors in layer_experts.items():
        used: set[int] = set()
        row = []
        for expert in range(tensors[0].shape[0]):
            pair = tuple(tensor[expert] for tensor in tensors)
            candidates = entries_by_fingerprint.setdefault(fingerprint(*pair), [])
            match = next(
                (
                    index
                    for index in candidates
                    if index not in used and all(torch.equal(a, b) for a, b in zip(pool[index], pair))
                ),
                None,
            )
            if match is None:
                match = len(pool)
                pool.append(pair)
                candidates.append(match)
            used.add(match)
            row.append(match)
        maps[tenant] = row
    return pool, maps


# Settings that one model applies to every tenant although they change no shape: the loss
# (`router_aux_loss_coef`, `output_router_logits`) and training noise (`router_jitter_noise`,
# `attention_dropout`). Tenants that differ in one are built only when the caller gives its value.
SHARED_SETTINGS = ("router_aux_loss_coef", "output_router_logits", "router_jitter_noise", "attention_dropout")


def check_settings(settings: Mapping[str, object]) -> dict[str, object]:
    """The caller's values for shared settings, checked before any source is opened."""
    unknown = sorted(set(settings) - set(SHARED_SETTINGS))
    if unknown:
        raise TypeError(
            f"Unexpected keyword arguments {unknown}; the settings given for every tenant are {list(SHARED_SETTINGS)}."
        )
    for key, value in settings.items():
        if key == "output_router_logits":
            if not isinstance(value, bool):
                raise TypeError(f"output_router_logits must be a bool, got {value!r}.")
        elif check_number(key, value) > 1 and key == "attention_dropout":
            raise ValueError(f"attention_dropout is a probability, at most 1; got {value!r}.")
    return dict(settings)


def shared_settings(configs: Mapping[str, PreTrainedConfig], given: Mapping[str, object]) -> dict[str, object]:
    """One value per shared setting: the caller's, else the one every tenant has."""
    resolved = {}
    reference = next(iter(configs.values()))
    for key in SHARED_SETTINGS:
        if not hasattr(reference, key):  # a setting this family does not have
            if key in given:
                raise TypeError(f"{reference.model_type} models have no {key} setting.")
            continue
        values = {name: getattr(config, key) for name, config in configs.items()}
        if key not in given and len(set(values.values())) > 1:
            raise IncompatibleTenantsError(
                f"Tenants differ in {key} ({values}), which one model applies to every tenant; pass the value to "
                f"use, e.g. from_models(..., {key}=...) or consolidate(..., {key}=...)."
            )
        resolved[key] = given.get(key, next(iter(values.values())))
    return resolved


def checked_dtype(dtype: torch.dtype | str) -> torch.dtype:
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}.")
    return resolved


def target_dtype(checkpoints: Mapping[str, TenantCheckpoint], dtype: torch.dtype | str | None) -> torch.dtype:
    """The caller's dtype, else the one the sources' weights are in (not what their configs say:
    a model turned to bf16 with `.to()` still has an fp32 config)."""
    if dtype is not None:
        return checked_dtype(dtype)
    found = {name: checkpoint.dtype for name, checkpoint in checkpoints.items()}
    if len(set(found.values())) > 1:
        readable = {name: str(value).removeprefix("torch.") for name, value in found.items()}
        raise IncompatibleTenantsError(
            f"Tenants hold their weights in different dtypes ({readable}); pass dtype= to choose the one to build in."
        )
    return next(iter(found.values()))


class TenantSet:
    """Opened, mutually compatible tenant checkpoints, read layer by layer in one target dtype."""

    def __init__(
        self,
        checkpoints: dict[str, TenantCheckpoint],
        default_tenant: str | None,
        dtype,
        settings: Mapping[str, object] | None = None,
    ):
        self.checkpoints = checkpoints
        self.names = list(checkpoints)
        self.family: Family = checkpoints[self.names[0]].family
        self.family.check(checkpoints[self.names[0]].config)
        self.default_tenant = self.names[0] if default_tenant is None else default_tenant
        if self.default_tenant not in checkpoints:
            raise ValueError(f"default_tenant {self.default_tenant!r} is not one of the tenants {self.names}.")
        self.reference = checkpoints[self.names[0]].config
        self.settings = shared_settings({name: c.config for name, c in checkpoints.items()}, settings or {})
        self.dtype = target_dtype(checkpoints, dtype)
        for checkpoint in checkpoints.values():
            checkpoint.generation_config  # read now: a broken file is refused before any weight is read
        self.shapes = expected_shapes(checkpoints[self.names[0]])
        for name, checkpoint in checkpoints.items():
            unexpected = sorted(set(checkpoint.names()) - set(self.shapes))
            if unexpected:
                raise CheckpointError(
                    f"Tenant {name!r}: unexpected tensors for a {self.family.model_type} checkpoint: {unexpected[:5]}."
                )
        self.expert_parameters = checkpoints[self.names[0]].expert_parameters
        self.sparse_layers = self.family.sparse_layers(self.reference)
        self.layer_paths = self.family.layer_paths(self.reference)

    @classmethod
    def open(
        cls,
        models: Mapping[str, TenantSource],
        *,
        default_tenant: str | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        family: Family | None = None,
        **settings,
    ) -> TenantSet:
        """Check the caller's options, then open (lazily) and check every source (all of `family`,
        when given)."""
        settings = check_settings(settings)
        if dtype is not None:
            checked_dtype(dtype)
        return cls(open_checkpoints(models, revision, family), default_tenant, dtype, settings)

    @property
    def num_layers(self) -> int:
        return len(self.layer_paths)

    @property
    def device(self) -> torch.device:
        """Where the sources' weights lie, when all on one device (loaded models on a GPU): the model
        built from them goes there. The CPU otherwise."""
        return one_device(checkpoint.device for checkpoint in self.checkpoints.values())

    def layer_experts(self, layer_idx: int) -> dict[str, ExpertTensors]:
        """Every tenant's experts of one sparse layer, checked and cast: the most ever held at once."""
        experts = {}
        for name, checkpoint in self.checkpoints.items():
            tensors = checkpoint.experts(layer_idx)
            experts[name] = tuple(
                checked(tensor, tenant=name, name=key, shape=self.shapes[key], dtype=self.dtype)
                for tensor, key in zip(tensors, checkpoint.expert_keys(layer_idx))
            )
        return experts

    def own_keys(self, name: str) -> list[str]:
        """The names of tenant `name`'s own tensors: not experts, and a tied embedding once, whatever
        names read it (its lm_head; Switch's stack embeddings too)."""
        tied = self.checkpoints[name].tied_aliases
        return [key for key in self.shapes if not self.family.is_expert_key(key) and key not in tied]

    def own_tensor(self, name: str, key: str) -> torch.Tensor:
        return checked(self.checkpoints[name].tensor(key), tenant=name, name=key, shape=self.shapes[key], dtype=self.dtype)

    def non_expert_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """One tenant's own tensors, under their multi-tenant names."""
        return {self.family.tenant_key(key, name, self.layer_paths): self.own_tensor(name, key) for key in self.own_keys(name)}

    def own_tensors_side_by_side(self) -> dict[str, torch.Tensor]:
        """Every tenant's own tensors, under their multi-tenant names; those of a decoder layer with
        every tenant's copy of one parameter in one storage, in tenant order, as the multi-tenant
        layers keep them for mixed batches (`MultiTenantDecoderLayer.lay_out_projections`). Read
        one parameter of all tenants at a time, the model is then built without a second copy of
        the tenants' layers (at 8 tenants of Mixtral-8x22B, tens of GB)."""
        state = {}
        in_layers = tuple(f"{path}." for path in self.layer_paths)
        for key in self.own_keys(self.names[0]):
            if key.startswith(in_layers):  # every tenant has it (tied aliases are embeddings and heads)
                stacked = torch.stack([self.own_tensor(name, key) for name in self.names])
                state.update((self.family.tenant_key(key, name, self.layer_paths), row) for name, row in zip(self.names, stacked))
        for name in self.names:
            state.update(
                (self.family.tenant_key(key, name, self.layer_paths), self.own_tensor(name, key))
                for key in self.own_keys(name)
                if not key.startswith(in_layers)
            )
        return state

    def generation_configs(self) -> dict:
        """Each tenant's generation settings, from its source (a copy per model built)."""
        return {name: copy.deepcopy(checkpoint.generation_config) for name, checkpoint in self.checkpoints.items()}

    def tokenizers(self) -> dict:
        """The tokenizers of the tenants whose source has its own (a copy per model built)."""
        return {name: copy.deepcopy(c.tokenizer) for name, c in self.checkpoints.items() if c.tokenizer is not None}

    def config(
        self,
        pool_sizes: list[int],
        expert_maps: dict[str, list[list[int]]],
        delta_ranks: dict[str, list[list[int]]] | None = None,
    ) -> MultiTenantConfigMixin:
        fields = self.reference.to_dict()
        for field in ("model_type", "architectures", "transformers_version", "auto_map"):
            fields.pop(field, None)
        if "max_position_embeddings" in fields:
            fields["max_position_embeddings"] = max(c.config.max_position_embeddings for c in self.checkpoints.values())
        tenants = {
            name: {
                "expert_map": expert_maps[name],
                "tie_word_embeddings": checkpoint.tie_word_embeddings,
                "pad_token_id": checkpoint.config.pad_token_id,
                "source": checkpoint.label,
            }
            for name, checkpoint in self.checkpoints.items()
        }
        for name, ranks in (delta_ranks or {}).items():
            if any(any(row) for row in ranks):
                tenants[name]["delta_ranks"] = ranks
        return config_class_for(self.family)(
            **fields
            | self.settings
            | {
                "dtype": self.dtype,
                "tie_word_embeddings": False,
                "tenants": tenants,
                "default_tenant": self.default_tenant,
                "pool_sizes": pool_sizes,
            }
        )


# Per tenant with deltas in a layer: the rank of each local expert's delta and its delta tensors,
# named relative to the family's experts module (`multimoe.expert_deltas`).
LayerDeltas = dict[str, tuple[list[int], dict[str, torch.Tensor]]]
PoolBuilder = Callable[
    [int, dict[str, ExpertTensors]],
    "tuple[list[ExpertTensors], dict[str, list[int]]] | tuple[list[ExpertTensors], dict[str, list[int]], LayerDeltas]",
]


def delta_state(
    family: Family, experts_module: str, tenant: str, layer_paths: list[str], state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A tenant's delta tensors of one layer, named relative to the family's experts module there
    (`experts_module`), under their names in the multi-tenant model."""
    return {family.tenant_key(f"{experts_module}.{key}", tenant, layer_paths): tensor for key, tensor in state.items()}


def assemble(tenants: TenantSet, pool_for_layer: PoolBuilder) -> tuple[MultiTenantConfigMixin, dict[str, torch.Tensor]]:
    """Config and state dict of a multi-tenant model whose pools `pool_for_layer` decides.

    `pool_for_layer(layer_idx, experts)` gets every tenant's experts of that layer and returns
    the pool entries and, per tenant, the local expert -> pool index map; and, optionally, the
    tenants' low-rank deltas of that layer (`LayerDeltas`).
    """
    state_dict: dict[str, torch.Tensor] = {}
    pool_sizes: list[int] = []
    expert_maps: dict[str, list[list[int]]] = {name: [] for name in tenants.names}
    delta_ranks: dict[str, list[list[int]]] = {name: [] for name in tenants.names}
    experts_modules = tenants.family.experts_modules(tenants.reference)
    for layer_idx in range(tenants.num_layers):
        if not tenants.sparse_layers[layer_idx]:  # a dense layer: every tenant keeps its own MLP
            pool_sizes.append(0)
            for name in tenants.names:
                expert_maps[name].append([])
                delta_ranks[name].append([])
            continue
        pool, maps, *deltas = pool_for_layer(layer_idx, tenants.layer_experts(layer_idx))
        deltas = deltas[0] if deltas else {}
        stacked = tuple(torch.stack([entry[index] for entry in pool]) for index in range(len(pool[0])))
        prefix = tenants.family.multitenant_key(f"{tenants.layer_paths[layer_idx]}.experts")
        for name, tensor in tenants.family.experts_state(tenants.reference, stacked).items():
            state_dict[f"{prefix}.{name}"] = tensor
        pool_sizes.append(len(pool))
        for name in tenants.names:
            expert_maps[name].append(maps[name])
            ranks, state = deltas.get(name, ([0] * len(maps[name]), {}))
            delta_ranks[name].append(ranks)
            state_dict.update(delta_state(tenants.family, experts_modules[layer_idx], name, tenants.layer_paths, state))
        del pool
    state_dict.update(tenants.own_tensors_side_by_side())
    return tenants.config(pool_sizes, expert_maps, delta_ranks), state_dict


def assemble_lossless(tenants: TenantSet) -> tuple[MultiTenantConfigMixin, dict[str, torch.Tensor]]:
    """Share only experts that are bit-identical across tenants; keep everything else."""
    return assemble(tenants, lambda layer_idx, experts: identical_expert_pool(experts))


__all__ = ["TenantSet", "assemble", "assemble_lossless", "identical_expert_pool"]
