"""Assembling a multi-tenant state dict and config from N Mixtral checkpoints.

The lossless assembly stores an expert once when it is bit-identical (after the cast to the target
dtype) to one already in the same layer's pool; a pool entry serves at most one local expert of
each tenant. Everything is read and checked tensor by tensor, layer by layer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from transformers import MixtralForCausalLM

from .checkpoints import CheckpointError, TenantCheckpoint, TenantSource, check_compatible, is_expert_key
from .configuration import MultiTenantMixtralConfig, validate_tenant_name

ExpertPair = tuple[torch.Tensor, torch.Tensor]


def tenant_key(mixtral_key: str, tenant: str) -> str:
    """Where a Mixtral (v5 naming) non-expert parameter of `tenant` lives in the multi-tenant model."""
    if mixtral_key.startswith("model.layers."):
        _, _, layer_idx, rest = mixtral_key.split(".", 3)
        rest = rest.replace("mlp.gate.", "router.", 1)
        return f"model.layers.{layer_idx}.tenants.{tenant}.{rest}"
    module, parameter = mixtral_key.rsplit(".", 1)
    return f"{module}.{tenant}.{parameter}"


def pool_keys(layer_idx: int) -> tuple[str, str]:
    return f"model.layers.{layer_idx}.experts.gate_up_proj", f"model.layers.{layer_idx}.experts.down_proj"


def open_checkpoints(models: Mapping[str, TenantSource], revision: str | None) -> dict[str, TenantCheckpoint]:
    if not isinstance(models, Mapping) or not models:
        raise ValueError("Give at least one tenant, as a mapping {tenant name: model, directory or Hub id}.")
    for name in models:
        validate_tenant_name(name)
    checkpoints = {name: TenantCheckpoint.open(source, tenant=name, revision=revision) for name, source in models.items()}
    check_compatible(checkpoints)
    return checkpoints


def expected_shapes(checkpoint: TenantCheckpoint) -> dict[str, torch.Size]:
    """Parameter shapes of a plain Mixtral with this config, measured on the meta device."""
    with torch.device("meta"):
        reference = MixtralForCausalLM(checkpoint.config)
    return {name: tensor.shape for name, tensor in reference.state_dict().items()}


def checked(tensor: torch.Tensor, *, tenant: str, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The tensor in `dtype` on the CPU, after shape and finiteness checks that name it on failure."""
    if tensor.shape != shape:
        raise CheckpointError(f"Tenant {tenant!r}: {name} has shape {list(tensor.shape)}, expected {list(shape)}.")
    if not tensor.is_floating_point():
        raise CheckpointError(f"Tenant {tenant!r}: {name} has dtype {tensor.dtype}, expected a floating dtype.")
    tensor = tensor.detach().to(device="cpu", dtype=dtype)
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"Tenant {tenant!r}: {name} contains NaN or Inf values.")
    return tensor.contiguous()


def fingerprint(gate_up: torch.Tensor, down: torch.Tensor) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for tensor in (gate_up, down):
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.dim() else tensor.numpy().tobytes())
    return digest.digest()


def identical_expert_pool(layer_experts: Mapping[str, ExpertPair]) -> tuple[list[ExpertPair], dict[str, list[int]]]:
    """Pool entries and per-tenant local -> pool maps, sharing only bit-identical experts."""
    pool: list[ExpertPair] = []
    entries_by_fingerprint: dict[bytes, list[int]] = {}
    maps: dict[str, list[int]] = {}
    for tenant, (gate_up, down) in layer_experts.items():
        used: set[int] = set()
        row = []
        for expert in range(gate_up.shape[0]):
            pair = (gate_up[expert], down[expert])
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


def resolve_dtype(checkpoint: TenantCheckpoint, dtype: torch.dtype | str | None) -> torch.dtype:
    dtype = dtype if dtype is not None else checkpoint.config.dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def assemble_lossless(
    models: Mapping[str, TenantSource],
    *,
    default_tenant: str | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
) -> tuple[MultiTenantMixtralConfig, dict[str, torch.Tensor]]:
    checkpoints = open_checkpoints(models, revision)
    names = list(checkpoints)
    default_tenant = names[0] if default_tenant is None else default_tenant
    if default_tenant not in checkpoints:
        raise ValueError(f"default_tenant {default_tenant!r} is not one of the tenants {names}.")
    reference = checkpoints[names[0]]
    dtype = resolve_dtype(reference, dtype)
    shapes = expected_shapes(reference)
    non_expert = [key for key in shapes if not is_expert_key(key)]
    for name, checkpoint in checkpoints.items():
        unexpected = sorted(set(checkpoint.names()) - set(shapes))
        if unexpected:
            raise CheckpointError(f"Tenant {name!r}: unexpected tensors for a Mixtral checkpoint: {unexpected[:5]}.")

    state_dict: dict[str, torch.Tensor] = {}
    pool_sizes: list[int] = []
    expert_maps: dict[str, list[list[int]]] = {name: [] for name in names}
    for layer_idx in range(reference.config.num_hidden_layers):
        gate_up_key, down_key = pool_keys(layer_idx)
        mixtral_gate_up, mixtral_down = (f"model.layers.{layer_idx}.mlp.experts.{p}" for p in ("gate_up_proj", "down_proj"))
        layer_experts = {}
        for name, checkpoint in checkpoints.items():
            gate_up, down = checkpoint.experts(layer_idx)
            layer_experts[name] = (
                checked(gate_up, tenant=name, name=mixtral_gate_up, shape=shapes[mixtral_gate_up], dtype=dtype),
                checked(down, tenant=name, name=mixtral_down, shape=shapes[mixtral_down], dtype=dtype),
            )
        pool, maps = identical_expert_pool(layer_experts)
        state_dict[gate_up_key] = torch.stack([gate_up for gate_up, _ in pool])
        state_dict[down_key] = torch.stack([down for _, down in pool])
        pool_sizes.append(len(pool))
        for name, row in maps.items():
            expert_maps[name].append(row)
        del layer_experts, pool

    for name, checkpoint in checkpoints.items():
        for key in non_expert:
            if key == "lm_head.weight" and checkpoint.tie_word_embeddings:
                continue
            tensor = checkpoint.tensor(key)
            state_dict[tenant_key(key, name)] = checked(tensor, tenant=name, name=key, shape=shapes[key], dtype=dtype)

    config_fields = reference.config.to_dict()
    for field in ("model_type", "architectures", "transformers_version", "auto_map"):
        config_fields.pop(field, None)
    config_fields["max_position_embeddings"] = max(c.config.max_position_embeddings for c in checkpoints.values())
    config = MultiTenantMixtralConfig(
        **config_fields
        | {
            "dtype": dtype,
            "tie_word_embeddings": False,
            "tenants": {
                name: {
                    "expert_map": expert_maps[name],
                    "tie_word_embeddings": checkpoint.tie_word_embeddings,
                    "source": checkpoint.label,
                }
                for name, checkpoint in checkpoints.items()
            },
            "default_tenant": default_tenant,
            "pool_sizes": pool_sizes,
        }
    )
    return config, state_dict


__all__ = ["assemble_lossless", "identical_expert_pool", "tenant_key"]
