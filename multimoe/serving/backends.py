"""How each compared system holds its tenants and gets a batch ready to run.

A backend owns a model and answers `prepare(row_tenants)` with the forward keyword arguments for
that batch, after doing whatever the system must do first (copying weights in, for the swapping
baselines). The replay measures that work as part of the request's service, as the paper does
(TTFT = swap time + prefill).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from itertools import chain

import torch
from torch import nn
from transformers import MixtralForCausalLM

from ..memory import parameter_bytes
from ..modeling import MultiTenantMixtralForCausalLM


def tensor_bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class Backend:
    """A serving system: `model`, whether one batch may mix tenants, the tenants it serves (`None`:
    any, for a model that ignores them) and the per-batch preparation."""

    name: str
    mixes_tenants: bool
    model: nn.Module
    tenants: Collection[str] | None

    def prepare(self, row_tenants: Sequence[str]) -> dict:
        raise NotImplementedError

    def memory_bytes(self) -> int:
        return parameter_bytes([self.model])


class SharedPoolBackend(Backend):
    """multimoe: every tenant resident by reference; each row names its tenant.

    With `mix_tenants=False` a batch holds one tenant at a time (switching is free, and a
    one-tenant batch skips the per-tenant gathering): dLoRA's "merged" mode, which wins when
    traffic is concentrated on few tenants; the default is its "unmerged", mixed-batch mode.
    """

    def __init__(self, model: MultiTenantMixtralForCausalLM, mix_tenants: bool = True):
        self.model = model
        self.mixes_tenants = mix_tenants
        self.name = "multimoe" if mix_tenants else "multimoe (one tenant per batch)"
        self.tenants = model.tenants

    def prepare(self, row_tenants: Sequence[str]) -> dict:
        return {"tenant_names": list(row_tenants)}


class SingleModelBackend(Backend):
    """One plain model answers every request, whatever its tenant: the upper bound."""

    name = "single model"
    mixes_tenants = True
    tenants = None

    def __init__(self, model: MixtralForCausalLM):
        self.model = model

    def prepare(self, row_tenants: Sequence[str]) -> dict:
        return {}


class CopyInBackend(Backend):
    """A resident model whose tenant-specific tensors are copied in from host copies on a switch."""

    mixes_tenants = False

    def __init__(self, model: nn.Module, host_copies: Mapping[str, Mapping[str, torch.Tensor]], resident: str):
        self.model = model
        self.host_copies = host_copies
        self.tenants = list(host_copies)
        self.resident = resident
        self.switches = 0

    def prepare(self, row_tenants: Sequence[str]) -> dict:
        (tenant,) = set(row_tenants)
        if tenant != self.resident:
            with torch.no_grad():
                for name, tensor in self.host_copies[tenant].items():
                    self.model.get_parameter_or_buffer(name).copy_(tensor, non_blocking=True)
            self.resident = tenant
            self.switches += 1
        return {}

    def memory_bytes(self) -> int:
        return parameter_bytes([self.model]) + sum(tensor_bytes(c.values()) for c in self.host_copies.values())


def whole_model_swap(models: Mapping[str, MixtralForCausalLM]) -> CopyInBackend:
    """One resident model; a switch reloads every weight of the new tenant from host memory."""
    first = next(iter(models))
    resident = copy.deepcopy(models[first])
    host = {name: {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()} for name, m in models.items()}
    backend = CopyInBackend(resident, host, first)
    backend.name = "whole-model swap"
    return backend


def partial_reconfiguration(model: MultiTenantMixtralForCausalLM) -> CopyInBackend:
    """The paper's mechanism: the shared pool stays resident; a switch copies the new tenant's
    non-expert weights (and expert map) into one resident slot."""
    config = copy.deepcopy(model.config)
    first = model.tenants[0]
    config.tenants = {"slot": dict(config.tenants[first], tie_word_embeddings=False)}
    config.default_tenant = "slot"
    slot = MultiTenantMixtralForCausalLM(config).to(model.device, model.dtype).eval()
    for slot_layer, layer in zip(slot.model.layers, model.model.layers):
        slot_layer.experts = layer.experts  # the pool is shared by reference, never copied
    slot_prefixes = list(slot.tenant_modules("slot"))
    host = {
        tenant: {
            f"{slot_prefix}.{name}": tensor.detach().to("cpu", copy=True)
            for slot_prefix, module in zip(slot_prefixes, model.tenant_modules(tenant).values())
            for name, tensor in chain(module.named_parameters(), module.named_buffers())
        }
        for tenant in model.tenants
    }
    backend = CopyInBackend(slot, host, resident="")
    backend.prepare([first])
    backend.switches = 0
    backend.name = "partial reconfiguration (copy)"
    return backend


__all__ = [
    "Backend",
    "CopyInBackend",
    "SharedPoolBackend",
    "SingleModelBackend",
    "partial_reconfiguration",
    "whole_model_swap",
]
