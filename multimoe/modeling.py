"""Multi-tenant causal LMs of any registered MoE family: one shared expert pool per sparse layer,
each tenant's own everything-else, all computed by the family's own transformers classes.

Layout (state-dict names are the family's, with the tenant inserted):

    model.embed_tokens.<tenant>                 the tenant's embedding
    model.layers.<l>.experts                    the family's experts class holding the layer's P_l pool
                                                entries (sparse layers only), stored once for all tenants
    model.layers.<l>.tenants.<tenant>           the tenant's own decoder layer, of the family's class; its
                                                sparse block's experts are a `TenantExperts` reading the pool
    model.norm.<tenant>, lm_head.<tenant>       the tenant's final norm and output head

Every module is registered exactly once. A call resolves its tenants once (`TenantRouting`) and
runs the family's own base model and causal-LM code on a *view*: the family's module tree, built
once on the meta device, whose embedding, layers, norm and head are the tenant's registered
modules. A batch that mixes tenants runs on the mixed view, whose modules each stand for every
tenant's own (`RowDispatch`): every tenant group's rows go through that tenant's weights (each
projection as one batched product, `GroupedProjection`), and the pool runs once for all rows. Switching tenants only changes a string: nothing is re-pointed, copied
or registered twice, and the cost does not depend on model size.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase
from transformers import StoppingCriteriaList
from transformers import initialization as init
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import maybe_install_capturing_hooks

from .batched_projections import NotBatched, WeightProducts, batchable, batched_linear, is_weight_product, lay_side_by_side
from .checkpoints import (
    HUB_DOWNLOAD_OPTIONS,
    SAVED_CHECKPOINT,
    CheckpointError,
    TenantSource,
    check_saved_directory,
    read_json,
    read_tokenizer,
    resolve_directory,
    strict_from_pretrained,
)
from .concurrency import TenantLock
from .configuration import MultiTenantConfigMixin, config_class_for
from .expert_deltas import DeltaLayout, ExpertDeltas, run_with_deltas
from .families import FAMILIES, Family
from .generation import generation_for_rows
from .hub import push_to_hub, write_model_card
from .memory import MemoryReport
from .pool_padding import pool_padding_converter
from .pool_window import call_pool
from .routing import (
    CALL_GENERATION_CONFIGS,
    MIXED_ROUTING,
    SCOPED_TENANTS,
    TenantRouting,
    UnknownTenantError,
    claim_cache,
    token_positions,
)
from .saving import atomic_save_pretrained, is_main_writer
from .validation import check_number


def build_time(module: str):
    """A module of the multimoe package that builds or edits models (a higher floor than this one).

    It is imported by name, not by a relative import, so that the remote code transformers copies
    beside a saved checkpoint (this file and its relative imports) holds only what loading and
    running need; building needs the installed package.
    """
    try:
        return importlib.import_module(f"multimoe.{module}")
    except ModuleNotFoundError as error:
        raise ImportError(f"Building or editing a multi-tenant model needs the multimoe package: {error}") from error


# Each tenant's own files (its generation config, and its tokenizer where it has one) lie in
# `tenants/<name>/` of a checkpoint.
TENANTS_FOLDER = "tenants"


def read_tenant_generation_configs(model, checkpoint: Path) -> dict[str, GenerationConfig]:
    """Each tenant's generation config from `tenants/<name>/generation_config.json` of a local
    `checkpoint` directory. A checkpoint of an earlier release has no `tenants/` folder, and then
    every tenant gets the one transformers loaded; one that misses a tenant's file, or holds an
    unreadable one, is refused: falling back would run that tenant with another's EOS."""
    folder = checkpoint / TENANTS_FOLDER
    if not folder.is_dir():
        return {name: copy.deepcopy(model.generation_config) for name in model.tenants}
    configs = {}
    for name in model.tenants:
        try:  # by path: `GenerationConfig.from_pretrained` ignores `subfolder` beside a generation_config.json
            configs[name] = GenerationConfig.from_pretrained(folder / name)
        except OSError as error:
            raise CheckpointError(
                f"Tenant {name!r}: cannot read {TENANTS_FOLDER}/{name}/generation_config.json of {checkpoint} "
                f"({error}); without it the tenant would generate with another tenant's settings."
            ) from error
    return configs


def read_tenant_tokenizers(model, checkpoint: Path) -> dict[str, PreTrainedTokenizerBase]:
    """The tokenizers saved in `tenants/<name>/` of a local `checkpoint` directory, of the tenants
    that have one: none in a checkpoint of an earlier release, whose tenants share its tokenizer."""
    found = {
        name: read_tokenizer(checkpoint / TENANTS_FOLDER / name, owner=f"Tenant {name!r}") for name in model.tenants
    }
    return {name: tokenizer for name, tokenizer in found.items() if tokenizer is not None}


def unregistered(module: nn.Module, **references) -> None:
    """Attach `references` to `module` as plain attributes: modules it calls but does not own."""
    module.__dict__.update(references)


# -- a tenant's layer: the family's own, its experts reading the shared pool ---------------------


class TenantExperts(ExpertDeltas, nn.Module):
    """Where a tenant's sparse block keeps its experts: the map from its E local experts to the
    layer's pool entries, and the tenant's low-rank deltas of them where it has any
    (`multimoe.expert_deltas`). The family's block calls it exactly as it calls its own experts
    (`experts(hidden, top_k_index, top_k_weights)`, or Switch's one-hot dispatch mask), so the
    family's router, shared experts and scaling run unchanged; it only maps the routing to pool
    entries (`Family.pool_routing`) and calls the pool."""

    def __init__(self, layer: MultiTenantDecoderLayer, tenant: str):
        super().__init__()
        unregistered(self, layer=layer)
        self.tenant = tenant
        self.register_buffer("expert_map", self.expert_map_from(layer.config), persistent=False)
        ranks = DeltaLayout(tuple(layer.config.delta_ranks(tenant, layer.layer_idx)))
        self.register_deltas(ranks, layer.config.family.expert_shapes(layer.experts), layer.experts_dtype)

    def expert_map_from(self, config: MultiTenantConfigMixin) -> torch.Tensor:
        return torch.tensor(config.expert_map(self.tenant, self.layer.layer_idx), dtype=torch.long)

    def forward(self, hidden_states: torch.Tensor, routing: torch.Tensor, weights: torch.Tensor):
        layer = self.layer
        if self.has_deltas:
            return layer.run_with_deltas([self], hidden_states, routing, weights, owner=None)
        pool_routing = layer.config.family.pool_routing(routing, self.expert_map, layer.pool_size)
        return call_pool(layer.experts, hidden_states, pool_routing, weights)


# -- a mixed batch: modules that stand for every tenant's own ----------------------------------


# The keyword arguments a family's layers pass with one entry per row (batch on dim 0, unless
# broadcast over the batch); a module run per tenant group gets them cut to the group's rows.
PER_ROW_ARGUMENTS = (
    "attention_mask",
    "mask",
    "position_ids",
    "position_embeddings",
    "position_bias",
    "attention_scaling",  # Beam's position-dependent query scaling
    "key_value_states",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "encoder_decoder_position_bias",
)


def rows_of(value, batch_rows: torch.Tensor, batch_size: int):
    """A per-row argument (a mask, position ids or embeddings: batch on dim 0) cut to some rows;
    one broadcast over the batch (dim 0 of size 1) passes unchanged."""
    if isinstance(value, tuple):
        return tuple(rows_of(item, batch_rows, batch_size) for item in value)
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch_size:
        return value.index_select(0, batch_rows)
    return value


CACHE_ARGUMENTS = ("cache", "past_key_values")


class GroupCache:
    """The KV cache as one tenant group's rows see it, for a module run per group (attention with
    weights of its own outside its projections, such as gpt-oss's sinks). `update` returns what the
    cache's own update would return for these rows, from a copy of the layer's state cut to them;
    `commit` then updates the cache once with every group's new states, in batch order."""

    def __init__(self, cache: Cache, batch_rows: torch.Tensor, batch_size: int, pending: dict):
        self.cache, self.batch_rows, self.batch_size = cache, batch_rows, batch_size
        self.pending = pending.setdefault(id(cache), (cache, {}))[1]

    @classmethod
    def of(cls, cache: Cache, batch_rows: torch.Tensor, batch_size: int, pending: dict) -> Cache | GroupCache:
        """The group's view of `cache`; an encoder-decoder cache stays one (the family's attention
        picks its self- or cross-attention half by type), each half seen by the group."""
        if not isinstance(cache, EncoderDecoderCache):
            return cls(cache, batch_rows, batch_size, pending)
        view = EncoderDecoderCache.__new__(EncoderDecoderCache)
        view.self_attention_cache = cls(cache.self_attention_cache, batch_rows, batch_size, pending)
        view.cross_attention_cache = cls(cache.cross_attention_cache, batch_rows, batch_size, pending)
        view.is_updated = cache.is_updated
        return view

    # What a module run per group may read off the cache besides `update`: answers that do not
    # depend on the rows. Anything else (a recurrent state of linear attention, a family's own cache
    # fields) would be the whole batch's, so it is refused rather than read.
    ROW_INDEPENDENT = ("get_seq_length", "get_mask_sizes", "is_compileable")

    def __getattr__(self, name: str):
        if name not in self.ROW_INDEPENDENT:
            raise ValueError(
                f"A mixed-tenant batch ran a module per tenant group that reads the cache's {name!r}, state "
                "multimoe does not cut by rows (such as linear attention's): run one tenant per call, or use_cache=False."
            )
        return getattr(self.cache, name)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layers = self.cache.layers
        while len(layers) <= layer_idx and getattr(self.cache, "layer_class_to_replicate", None) is not None:
            layers.append(self.cache.layer_class_to_replicate())
        layer = copy.copy(layers[layer_idx])
        for state, value in vars(layer).items():  # a static layer advances its length tensor in place
            if isinstance(value, torch.Tensor):
                cut = state in ("keys", "values") and getattr(layer, "is_initialized", False)
                setattr(layer, state, rows_of(value, self.batch_rows, self.batch_size) if cut else value.clone())
        self.pending.setdefault(layer_idx, []).append((key_states, value_states, args, kwargs))
        return layer.update(key_states, value_states, *args, **kwargs)

    @staticmethod
    def commit(pending: dict, routing: TenantRouting) -> None:
        """Update each cache the groups saw once, with every group's new states in batch order."""
        for cache, layers in pending.values():
            for layer_idx, updates in layers.items():
                keys, values = (torch.cat([update[index] for update in updates]) for index in (0, 1))
                if routing.order is not None:
                    keys, values = keys.index_select(0, routing.inverse), values.index_select(0, routing.inverse)
                _, _, args, kwargs = updates[0]
                cache.update(keys, values, layer_idx, *args, **kwargs)


def for_each_row(output, rows: int):
    """A group's output with anything broadcast over its rows (dim 0 of size 1, such as Switch's
    position bias) spelled out per row, so that the groups' outputs rejoin into the batch's."""
    if isinstance(output, tuple):
        return tuple(for_each_row(item, rows) for item in output)
    if isinstance(output, torch.Tensor) and output.dim() and output.shape[0] == 1 and rows > 1:
        return output.expand(rows, *output.shape[1:])
    return output


class RowDispatch(nn.Module):
    """In a mixed batch, the module at `path` of every tenant's own entry in `owner` (a ModuleDict
    keyed by tenant): each tenant group's rows go through that tenant's module. Per-row arguments
    (masks, positions) are cut to the group's rows; a KV cache is seen through a `GroupCache`."""

    def __init__(self, owner: nn.ModuleDict, path: str = ""):
        super().__init__()
        unregistered(self, owner=owner)
        self.path = path
        self.path_names = path.split(".") if path else []

    def tenant_module(self, name: str) -> nn.Module:
        module = self.owner[name]
        for child in self.path_names:  # `get_submodule`, without its checks: this runs per group per call
            module = module._modules[child]
        return module

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "owner" not in self.__dict__:  # copying or unpickling
                raise
            # A constant the family's code reads off the module (the same for every tenant); a tensor
            # would be one tenant's weight applied to every row, so it is refused.
            value = getattr(self.tenant_module(next(iter(self.owner.keys()))), name)
            if isinstance(value, torch.Tensor):
                raise AttributeError(
                    f"{self.path or 'module'}.{name} is a per-tenant tensor that the family's code reads directly; "
                    "a mixed-tenant batch cannot run it once for every row."
                ) from None
            return value

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        routing = MIXED_ROUTING.get()
        cache_key = next((key for key in CACHE_ARGUMENTS if kwargs.get(key) is not None), None)
        pending: dict = {}

        leading = hidden_states.shape[0]
        tokens = leading // routing.batch_size

        def run(name: str, rows: torch.Tensor, batch_rows: torch.Tensor):
            # Further positional tensors laid out like the hidden states (rows or their tokens) are cut too.
            positions = token_positions(batch_rows, tokens)
            inputs = [rows_of(value, positions, leading) for value in args]
            arguments = {
                key: rows_of(value, batch_rows, routing.batch_size) if key in PER_ROW_ARGUMENTS else value
                for key, value in kwargs.items()
            }
            if cache_key is not None:
                arguments[cache_key] = GroupCache.of(kwargs[cache_key], batch_rows, routing.batch_size, pending)
            output = self.tenant_module(name)(rows, *inputs, **arguments)
            return for_each_row(output, rows.shape[0])

        output = routing.map_groups(run, hidden_states)
        if pending:
            GroupCache.commit(pending, routing)
        return output


class GroupedProjection(RowDispatch):
    """A `RowDispatch` over the tenants' modules at `path` whose one weight enters a product
    `F.linear(x, weight, bias)`: an `nn.Linear`, or a top-k router (Mixtral's computes its logits
    so, then a softmax and a top-k). In inference, the groups whose weights lie side by side
    (`MultiTenantDecoderLayer.lay_out_projections`) run their products as one batched product,
    without copying a weight (see `multimoe.batched_projections`). A router runs once for every
    row, as the first group's tenant's module with its product taken per group; the rest of its code (the
    softmax, the top-k) treats each row alone, as a router does. Anything else (a LoRA wrapper, a
    hook, a gradient wanted, a module that uses its weight otherwise) runs per group, as
    `RowDispatch` does."""

    def __init__(self, owner: nn.ModuleDict, path: str = ""):
        super().__init__(owner, path)
        self.batches = True  # until a module is seen using its weight otherwise than in its product

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        routing = MIXED_ROUTING.get()
        modules = [self.tenant_module(name) for name, _ in routing.groups]
        tensors = None if args or kwargs or not self.batches else batchable(modules)
        if tensors is None:
            return super().forward(hidden_states, *args, **kwargs)

        def product(inputs: torch.Tensor) -> torch.Tensor:
            rows = inputs.reshape(-1, inputs.shape[-1])
            per_row = rows.shape[0] // routing.batch_size  # its tokens, and any further leading dims
            sizes = [(span.stop - span.start) * per_row for _, span in routing.groups]
            return batched_linear(rows, sizes, *tensors).view(*inputs.shape[:-1], -1)

        def run(ordered: torch.Tensor, _tokens: int):
            if type(modules[0]) is nn.Linear:
                return product(ordered)
            with WeightProducts(tensors[0][0], tensors[1][0], product, rows=ordered.numel() // ordered.shape[-1]):
                return modules[0](ordered)

        try:
            return routing.in_tenant_order(run, hidden_states)
        except NotBatched:
            self.batches = False
            return super().forward(hidden_states, *args, **kwargs)


class ReplayWithRouting:
    """Gradient checkpointing for a mixed batch's layer: the backward pass replays the layer outside
    the call, where no routing is current, so the replay gets the routing of the call it replays."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def __call__(self, function, *args, **kwargs):
        routing = MIXED_ROUTING.get()

        def replay(*inputs, **options):
            token = MIXED_ROUTING.set(routing)
            try:
                return function(*inputs, **options)
            finally:
                MIXED_ROUTING.reset(token)

        return self.checkpoint(replay, *args, **kwargs)


class RowMappedPool(nn.Module):
    """In a mixed batch's sparse block, the experts: each token's local expert indices go through its
    own tenant's map, then the pool runs once for every row of every tenant."""

    def __init__(self, layer: MultiTenantDecoderLayer):
        super().__init__()
        unregistered(self, layer=layer)

    def forward(self, hidden_states: torch.Tensor, routing: torch.Tensor, weights: torch.Tensor):
        rows, layer = MIXED_ROUTING.get(), self.layer
        owners = layer.tenant_experts()
        per_token = routing.shape[0] // rows.batch_size
        if any(owners[index].has_deltas for index in set(rows.tenant_ids.tolist())):
            owner = rows.tenant_ids.repeat_interleave(per_token)
            return layer.run_with_deltas(owners, hidden_states, routing, weights, owner)
        maps = rows.per_row([own.expert_map for own in owners])
        maps = maps.repeat_interleave(per_token, dim=0)
        pool_routing = layer.config.family.pool_routing(routing, maps, layer.pool_size)
        return call_pool(layer.experts, hidden_states, pool_routing, weights)


def materialize(module: nn.Module) -> nn.Module:
    """Give every meta tensor of `module` uninitialised storage on the current default device (the
    meta device itself while transformers loads), as `to_empty` does, leaving real tensors as they are."""
    device = torch.get_default_device()
    return module._apply(lambda tensor: torch.empty_like(tensor, device=device) if tensor.is_meta else tensor)


def copy_of(template: nn.Module, config) -> nn.Module:
    """A deep copy of a module built on the meta device that still computes with `config` itself, so
    that `set_attn_implementation` and `set_experts_implementation` on the model reach it."""
    return copy.deepcopy(template, {id(config): config})


def fresh_copy(template: nn.Module, config) -> nn.Module:
    """A copy of a module built on the meta device (see `copy_of`), in uninitialised storage of its own."""
    return materialize(copy_of(template, config))


def has_own_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


# A child's tensor read directly (`self.wg.weight`), or a child replaced (`self.classifier = ...`).
CHILD_TENSOR_USE = re.compile(r"self\.(\w+)\.(?:weight|bias)\b|self\.(\w+)\s*=(?!=)")


def reads_child_tensors(module: nn.Module) -> bool:
    """Whether the module's own forward reads a tensor of one of its children directly (HunYuan's
    router reads `self.wg.weight`) or replaces a child (Switch's router casts its classifier to
    float32 with `self.classifier = self.classifier.to(...)`): such a module runs whole per tenant
    group, since a stand-in for the child could only offer one tenant's tensor for every row, and
    what it did to the stand-in would not reach the tenants' own modules."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    children = set(dict(module.named_children()))
    return any(read in children or replaced in children for read, replaced in CHILD_TENSOR_USE.findall(source))


def holds_position_table(module: nn.Module) -> bool:
    """Whether the module looks rows up in a table of its own by position, not by token (Switch's
    relative attention bias): such a module runs whole per tenant group, since the lookup's input has
    no rows to split and its output (a bias over positions) is the tenant's own."""
    return any(isinstance(child, nn.Embedding) for child in module.children())


# -- the multi-tenant decoder layer ------------------------------------------------------------


class MultiTenantDecoderLayer(nn.Module):
    """Decoder layer `layer_idx` of every tenant: the shared pool (sparse layers) and each tenant's
    own decoder layer. A call names its tenant, or none for a mixed batch, which runs on `mixed`:
    the family's decoder layer whose weight-holding modules are `RowDispatch`es over the tenants'
    and whose experts are the `RowMappedPool`."""

    def __init__(self, config: MultiTenantConfigMixin, layer_idx: int, template: nn.Module):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        unregistered(self, template=template)
        family = config.family
        self.experts_path = family.experts_path(template)
        sparse = self.experts_path is not None
        if sparse != bool(config.pool_sizes[layer_idx]):
            raise ValueError(
                f"Layer {layer_idx} is {'sparse' if sparse else 'dense'} in {family.model_type} with this config, "
                f"but pool_sizes[{layer_idx}] is {config.pool_sizes[layer_idx]}."
            )
        if sparse:
            self.experts = family.pool(config, config.padded_pool_size(layer_idx))
        self.tenants = nn.ModuleDict({name: self.tenant_layer(template, name) for name in config.tenants})

    def tenant_layer(self, template: nn.Module, name: str) -> nn.Module:
        """A copy of the family's layer (built on the meta device) for tenant `name` in storage of its
        own, its experts replaced by the tenant's map into the pool (never allocated per tenant)."""
        layer = copy_of(template, self.config)
        if hasattr(self, "experts"):
            layer.set_submodule(self.experts_path, TenantExperts(self, name))
        return materialize(layer)

    @property
    def pool_size(self) -> int:
        """Entries the pool holds, padding included (see `padded_pool_size`)."""
        return self.config.padded_pool_size(self.layer_idx)

    def tenant_experts(self) -> list[TenantExperts]:
        """Each tenant's `TenantExperts`, in the tenants' order."""
        return [own.get_submodule(self.experts_path) for own in self.tenants.values()]

    @property
    def experts_dtype(self) -> torch.dtype:
        return next(self.experts.parameters()).dtype

    def run_with_deltas(
        self,
        owners: list[TenantExperts],
        hidden_states: torch.Tensor,
        routing: torch.Tensor,
        weights: torch.Tensor,
        owner: torch.Tensor | None,
    ) -> torch.Tensor:
        """The pool's output with each token's pick corrected by its tenant's delta (`owner`: each
        token's index into `owners`; `None`: all of `owners[0]`)."""
        if getattr(self.experts, "_is_expert_parallel", False):
            raise NotImplementedError("Low-rank expert deltas do not run expert parallel; load without ep_size.")
        family = self.config.family
        token, local, weight = family.routing_slots(routing, weights)
        maps = torch.stack([own.expert_map for own in owners])
        slot_owner = torch.zeros_like(local) if owner is None else owner[token]
        entry = maps[slot_owner, local]
        program = family.expert_program(self.experts)
        return run_with_deltas(self.experts, program, hidden_states, (token, entry, weight, slot_owner, local), owners)

    @property
    def mixed(self) -> nn.Module:
        """This layer for a mixed batch, built on first use (it holds no weights of its own)."""
        if "_mixed" not in self.__dict__:
            self.__dict__["_mixed"] = self.build_mixed()
        mixed = self.__dict__["_mixed"]
        if mixed.training != self.training:
            mixed.train(self.training)
        own = next(iter(self.tenants.values()))  # gradient checkpointing, as enabled on the tenants' layers
        mixed.gradient_checkpointing = getattr(own, "gradient_checkpointing", False)
        checkpoint = getattr(own, "_gradient_checkpointing_func", None)
        current = getattr(mixed, "_gradient_checkpointing_func", None)
        if checkpoint is not None and getattr(current, "checkpoint", None) is not checkpoint:
            mixed._gradient_checkpointing_func = ReplayWithRouting(checkpoint)
        return mixed

    def build_mixed(self) -> nn.Module:
        layer = copy_of(self.template, self.config)
        if has_own_tensors(layer):
            return RowDispatch(self.tenants)

        def stand_in(module: nn.Module, prefix: str) -> None:
            for name, child in list(module.named_children()):
                path = f"{prefix}{name}"
                if path == self.experts_path and hasattr(self, "experts"):
                    setattr(module, name, RowMappedPool(self))
                elif is_weight_product(child):
                    setattr(module, name, GroupedProjection(self.tenants, path))
                elif has_own_tensors(child) or reads_child_tensors(child) or holds_position_table(child):
                    setattr(module, name, RowDispatch(self.tenants, path))
                else:
                    stand_in(child, f"{path}.")

        stand_in(layer, "")
        return layer

    def lay_out_projections(self) -> None:
        """Put the tenants' weights (and biases) of each projection a mixed batch runs grouped side
        by side in memory, in tenant order, where they are not already (see
        `multimoe.batched_projections`); modules holding one weight (and bias) only, on a real device."""
        for grouped in self.grouped_projections:
            grouped.batches = True  # a module that used its weight otherwise may have been replaced since
            modules = [own.get_submodule(grouped.path) for own in self.tenants.values()]
            if not all(type(module) is type(modules[0]) and is_weight_product(module) for module in modules):
                continue
            for name in ("weight", "bias"):
                lay_side_by_side([module._parameters.get(name) for module in modules])

    @property
    def grouped_projections(self) -> list[GroupedProjection]:
        return [module for module in self.mixed.modules() if isinstance(module, GroupedProjection)]

    @property
    def grouped_paths(self) -> list[str]:
        return [module.path for module in self.grouped_projections]

    def _apply(self, fn, recurse: bool = True):
        # `.to()`, `.half()`, ... give each parameter a tensor of its own; lay them out again.
        super()._apply(fn, recurse)
        self.lay_out_projections()
        return self

    def forward(self, hidden_states: torch.Tensor, *args, tenant: str | None = None, **kwargs):
        layer = self.tenants[tenant] if tenant is not None else self.mixed
        return layer(hidden_states, *args, **kwargs)


def lay_out_projections(model: nn.Module) -> None:
    """Every layer's `lay_out_projections`."""
    for module in model.modules():
        if isinstance(module, MultiTenantDecoderLayer):
            module.lay_out_projections()


class LayerCall(nn.Module):
    """An entry of a view's `layers`: calls the registered multi-tenant layer for one tenant (or,
    with `tenant=None`, a mixed batch), so that hooks placed on it (device maps, offloading, output
    recording) run."""

    def __init__(self, layer: MultiTenantDecoderLayer, tenant: str | None):
        super().__init__()
        unregistered(self, layer=layer)
        self.tenant = tenant

    def forward(self, *args, **kwargs):
        return self.layer(*args, tenant=self.tenant, **kwargs)


def view_of(template: nn.Module, **children: nn.Module) -> nn.Module:
    """A shallow copy of a family's model `template` whose named children are replaced by `children`
    (the template itself is untouched). The view is never registered anywhere: it only routes a
    call through the family's own code to modules the multi-tenant model owns."""
    view = copy.copy(template)
    view._modules = dict(template._modules) | children
    view._parameters, view._buffers = {}, {}
    view._output_capturing_hooks_installed = True  # the multi-tenant model records outputs itself
    return view


def meta_template(model_class: type[PreTrainedModel], config) -> PreTrainedModel:
    with torch.device("meta"):
        return model_class(config)


# -- the models ----------------------------------------------------------------------------------


class MultiTenantPreTrainedModel(PreTrainedModel):
    """What every multi-tenant class shares. Each family's classes (`multitenant_classes`) derive
    from it and from the family's own `PreTrainedModel`, whose weight initialisation, attention and
    experts support flags and fp32 rules they inherit."""

    family: Family
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MultiTenantDecoderLayer"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing what would silently serve the wrong weights.

        transformers would initialise a missing or misshapen tensor at random, cast an integer
        tensor to float, keep NaN values and fall back to pickle; here each is a `CheckpointError`
        naming the file, tensor or key (see `multimoe.checkpoints.strict_from_pretrained`).
        """
        ep_size = getattr(kwargs.get("distributed_config"), "ep_size", None)
        if ep_size is None and isinstance(kwargs.get("distributed_config"), dict):
            ep_size = kwargs["distributed_config"].get("ep_size")
        check_number("ep_size", ep_size, positive=True, integer=True, optional=True)
        if ep_size and ep_size > 1 and args and args[0] is not None:
            # Split by experts: each pool padded to a multiple of the ranks for this load (a copy of
            # a given config: the caller's object is not changed).
            config = kwargs.get("config")
            if isinstance(config, MultiTenantConfigMixin):
                config = copy.deepcopy(config)
            else:  # not given, or a path to one
                options = {key: kwargs[key] for key in HUB_DOWNLOAD_OPTIONS if kwargs.get(key) is not None}
                config = cls.config_class.from_pretrained(
                    config or args[0], subfolder=kwargs.get("subfolder", ""), **options
                )
            config.pool_multiple = ep_size
            kwargs["config"] = config
        model = strict_from_pretrained(super().from_pretrained, *args, **kwargs)
        lay_out_projections(model[0] if isinstance(model, tuple) else model)  # loading gave each weight its own tensor
        return model

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for `@use_experts_implementation` in the source of the model class's
        # module; the pools are the family's own experts classes, so the family's answer holds.
        return cls.family.base_model_class._can_set_experts_implementation()

    def __call__(self, *args, **kwargs):
        # Calls see the tenant set whole: an edit in another thread waits (see `TenantLock`). A
        # compiled call runs inside `generate` or its caller's own synchronisation: locks do not trace.
        if torch.compiler.is_compiling():
            return super().__call__(*args, **kwargs)
        with self.base_model.tenant_lock.reading():
            if is_fully_sharded(self.base_model):  # before FSDP's hooks gather anything for this call
                check_same_tenants_on_every_rank(self.base_model.call_routing(args, kwargs))
            return super().__call__(*args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, TenantExperts):
            init.copy_(module.expert_map, module.expert_map_from(self.config))
            for delta in module.parameters(recurse=False):
                init.zeros_(delta)
        elif not isinstance(module, MultiTenantDecoderLayer):
            super()._init_weights(module)


class TenantRouter:
    """Which tenant each row of a call runs as, and running a view for them: what every
    multi-tenant base model shares, whatever its layout. The tenants are the keys of
    `tenant_embeddings`, in order."""

    tenant_embeddings: nn.ModuleDict

    def start_serving(self, config: MultiTenantConfigMixin) -> None:
        """The end of a base model's `__init__`, once its modules exist: the tenant state every call
        reads, transformers' post-init, and the views."""
        self.gradient_checkpointing = False
        self.active_tenant = config.default_tenant
        self.tenant_lock = TenantLock()
        self.post_init()
        self.build_views()

    def build_views(self) -> None:
        """One view per tenant and one for mixed batches, built ahead (a compiled call cannot build
        one); the layers' projections laid out for mixed batches, as after any edit."""
        lay_out_projections(self)
        self.views.clear()
        for tenant in (*self.tenant_names, None):
            self.view(tenant)

    def run(self, view: nn.Module, routing: TenantRouting, **inputs):
        """Call `view` (the family's own model code) for `routing`'s rows: a KV cache is tagged with
        the rows' tenants first, and a mixed batch's modules read the routing."""
        if routing.is_mixed and (inputs.get("output_router_logits") or inputs.get("output_attentions")):
            raise ValueError(
                "output_router_logits and output_attentions are per tenant: run a mixed-tenant batch one tenant "
                "per call to get them."
            )
        checking = not torch.compiler.is_compiling()  # a compiled call: see `generate`
        if inputs.get("cache") is not None and checking:
            claim_cache(inputs["cache"], routing)
        if any(inputs.get(f"output_{kind}") for kind in ("hidden_states", "attentions", "router_logits")):
            maybe_install_capturing_hooks(self)
        token = MIXED_ROUTING.set(routing) if routing.is_mixed else None
        try:
            output = view(**inputs)
        finally:
            if token is not None:
                MIXED_ROUTING.reset(token)
        created = getattr(output, "cache", None)  # the family's code made it (the kind it needs)
        if inputs.get("cache") is None and created is not None and checking:
            claim_cache(created, routing)
        return output
    @property
    def tenant_names(self) -> list[str]:
        return list(self.tenant_embeddings)

    def resolve_tenant(self, tenant: str | None) -> str:
        """The tenant a call runs as: the one it names, else the innermost `active()` block's, else
        the active tenant."""
        name = tenant if tenant is not None else SCOPED_TENANTS.get().get(id(self), self.active_tenant)
        return self.known_tenant(name)

    def known_tenant(self, name: str) -> str:
        """`name` itself if this model holds that tenant; `None` never names one."""
        if name is None:
            raise UnknownTenantError(f"Name a tenant: got None; known tenants: {self.tenant_names}.")
        if not isinstance(name, str) or name not in self.tenant_embeddings:
            raise UnknownTenantError(f"Unknown tenant {name!r}; known tenants: {self.tenant_names}.")
        return name

    def tenant_ids(self, tenant_names: list[str], device: torch.device | None = None) -> torch.LongTensor:
        """Row tenant names as indices into `tenant_names`, the form generate() expands with beams."""
        if isinstance(tenant_names, str) or not isinstance(tenant_names, (list, tuple)):
            raise ValueError(
                f"tenant_names takes a list with one name per row, got {tenant_names!r}; use tenant= for one tenant."
            )
        if not tenant_names:
            raise ValueError("tenant_names is empty: give one tenant name per row of a non-empty batch.")
        names = self.tenant_names
        return torch.tensor([names.index(self.known_tenant(name)) for name in tenant_names], device=device)

    def route_inputs(self, input_ids, inputs_embeds, tenant=None, tenant_names=None, tenant_ids=None) -> TenantRouting:
        """`route` for a forward's inputs (`input_ids` or `inputs_embeds`, batch on dim 0)."""
        rows = input_ids if input_ids is not None else inputs_embeds
        if rows is None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        routing = dict(tenant=tenant, tenant_names=tenant_names, tenant_ids=tenant_ids)
        return self.route(rows.shape[0], **routing, device=rows.device)

    def call_routing(self, args: tuple, kwargs: dict) -> TenantRouting:
        """`route` for the arguments of a call of a model (with or without its head), read before the
        call runs: its rows are the first of `input_ids`, `inputs_embeds`, `decoder_input_ids` given."""
        given = (kwargs.get(key) for key in ("input_ids", "inputs_embeds", "decoder_input_ids"))
        rows = next((value for value in given if value is not None), args[0] if args else None)
        if rows is None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        names = ("tenant", "tenant_names", "tenant_ids")
        return self.route(rows.shape[0], **{key: kwargs.get(key) for key in names}, device=rows.device)

    def route(
        self,
        batch_size: int,
        tenant: str | None = None,
        tenant_names: list[str] | None = None,
        tenant_ids: torch.LongTensor | None = None,
        device: torch.device | None = None,
    ) -> TenantRouting:
        """Resolve, once per call, which tenant each row runs as (tenant ids on the inputs' `device`)."""
        if sum(value is not None for value in (tenant, tenant_names, tenant_ids)) > 1:
            raise ValueError("Name the tenant once: pass only one of tenant, tenant_names or tenant_ids.")
        if batch_size == 0:
            raise ValueError("The batch has no rows: give at least one input row.")
        if tenant_names is not None:
            tenant_ids = self.tenant_ids(tenant_names, device)
        if tenant_ids is None:
            return TenantRouting.single(self.resolve_tenant(tenant), batch_size)
        if not isinstance(tenant_ids, torch.Tensor) or tenant_ids.dtype not in (torch.int32, torch.int64):
            kind = tenant_ids.dtype if isinstance(tenant_ids, torch.Tensor) else type(tenant_ids).__name__
            raise ValueError(
                f"tenant_ids must be an integer tensor with one index into {self.tenant_names} per row, got {kind}; "
                "tenant_names takes a list of names."
            )
        if tenant_ids.shape != (batch_size,):
            raise ValueError(
                f"Give one tenant per row: {batch_size} rows, tenant ids of shape {tuple(tenant_ids.shape)}."
            )
        if not 0 <= int(tenant_ids.min()) <= int(tenant_ids.max()) < len(self.tenant_names):
            raise UnknownTenantError(f"tenant_ids must index {self.tenant_names}; got {tenant_ids.tolist()}.")
        return TenantRouting.from_ids(tenant_ids if device is None else tenant_ids.to(device), self.tenant_names)

    def get_input_embeddings(self) -> nn.Embedding:
        """The current tenant's embedding (see `resolve_tenant`), so `inputs_embeds` built from it
        match what a call without `tenant=` runs as."""
        return self.tenant_embeddings[self.resolve_tenant(None)]

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tenant_embeddings[self.resolve_tenant(None)] = value

def unwrapped_class(model: nn.Module) -> type:
    """The model's own class under the `FSDP<class>` that `fully_shard` gives it."""
    return next(base for base in type(model).__mro__ if not issubclass(base, FSDPModule))


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) manages `model` or its layers, as transformers' FSDP plan
    wraps each (a tensor-parallel split gives every rank the same rows: nothing to check). Cheap,
    since every forward asks: no process group, no look at the modules."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    layer = next((module for module in model.modules() if isinstance(module, MultiTenantDecoderLayer)), None)
    return isinstance(model, FSDPModule) or isinstance(layer, FSDPModule)


def check_same_tenants_on_every_rank(routing: TenantRouting) -> None:
    """Refuse a call whose ranks run different tenants, or the same in another order, under FSDP2.
    Each rank gathers an FSDP unit's weights before using them and reduces the gradients of those
    that have one: ranks whose rows name other tenants, or name them in another order, would gather
    or reduce one tenant's unit against another's (the units a family keeps in float32, such as
    DeepSeek-V3's routers in a bfloat16 model, are per tenant), pairing their weights silently, or
    reduce buffers of other sizes and abort."""
    tenants = [name for name, _ in routing.groups]
    every_rank: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every_rank, tenants)
    if any(other != tenants for other in every_rank):
        raise ValueError(
            "Under FSDP2 every rank must run the same tenants, in the same order (the order its rows first name "
            f"them), in each call; the ranks' rows name {every_rank}. Give every rank rows of the same tenants in "
            "the same order (for example every tenant in every batch, in the model's order)."
        )


class MultiTenantModel(TenantRouter, MultiTenantPreTrainedModel):
    """The decoder stack: each tenant's embedding and final norm, and the multi-tenant layers."""

    def __init__(self, config: MultiTenantConfigMixin):
        super().__init__(config)
        template = meta_template(self.family.base_model_class, config)
        unregistered(self, template=template, views={})
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.ModuleDict({name: self.tenant_embedding(name) for name in config.tenants})
        self.layers = nn.ModuleList(
            [MultiTenantDecoderLayer(config, idx, template.layers[idx]) for idx in range(config.num_hidden_layers)]
        )
        self.norm = nn.ModuleDict({name: self.fresh("norm") for name in config.tenants})
        # One rotary embedding for every tenant (their rope settings agree), where the family has one.
        rotary = getattr(template, "rotary_emb", None)
        self.rotary_emb = type(rotary)(config=config) if rotary is not None else None
        self.start_serving(config)

    @property
    def tenant_embeddings(self) -> nn.ModuleDict:
        return self.embed_tokens

    def fresh(self, child: str) -> nn.Module:
        """A new tenant's own copy of the family model's `child` (e.g. its norm), uninitialised."""
        return fresh_copy(self.template.get_submodule(child), self.config)

    def init_parallel_plans(self) -> None:
        """transformers' plans; as for the family's model, a tensor-parallel plan splits the input
        embeddings by vocabulary unless it names them: here each tenant's."""
        super().init_parallel_plans()
        if self._tp_plan and not any(rule.startswith("embed_tokens") for rule in self._tp_plan):
            self._tp_plan |= self.family.multitenant_plan({"embed_tokens": "embedding_rowwise"}, self.config.tenants)

    def tenant_embedding(self, name: str) -> nn.Module:
        """Tenant `name`'s embedding, uninitialised, with its own padding token (whose row training
        leaves alone), as its source had it."""
        embedding = self.fresh("embed_tokens")
        if hasattr(embedding, "padding_idx"):
            embedding.padding_idx = self.config.tenants[name].get("pad_token_id", self.config.pad_token_id)
        return embedding

    def view(self, tenant: str | None) -> nn.Module:
        """The family's base model running tenant `tenant`'s modules (`None`: a mixed batch's)."""
        view = self.views.get(tenant)
        if view is None or not self.view_is_current(view, tenant):
            pick = RowDispatch if tenant is None else (lambda owner: owner[tenant])
            shared = {"rotary_emb": self.rotary_emb} if self.rotary_emb is not None else {}
            view = self.views[tenant] = view_of(
                self.template,
                embed_tokens=pick(self.embed_tokens),
                layers=nn.ModuleList([LayerCall(layer, tenant) for layer in self.layers]),
                norm=pick(self.norm),
                **shared,
            )
        view.training = self.training
        return view

    def view_is_current(self, view: nn.Module, tenant: str | None) -> bool:
        """Whether `view` still holds the registered modules (an embedding resize replaces them)."""
        if len(view.layers) != len(self.layers) or getattr(view, "rotary_emb", None) is not self.rotary_emb:
            return False
        return tenant is None or (view.embed_tokens is self.embed_tokens[tenant] and view.norm is self.norm[tenant])

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        tenant: str | None = None,
        tenant_names: list[str] | None = None,
        tenant_ids: torch.LongTensor | None = None,
        routing: TenantRouting | None = None,
        **kwargs,
    ):
        """The family's base-model forward, as tenant `tenant` (or one tenant per row; see the causal LM)."""
        if routing is None:
            routing = self.route_inputs(input_ids, kwargs.get("inputs_embeds"), tenant, tenant_names, tenant_ids)
        return self.run(self.view(routing.tenant), routing, input_ids=input_ids, **kwargs)


class MultiTenantLM(MultiTenantPreTrainedModel, GenerationMixin):
    """What every multi-tenant model with a language-modelling head shares, whatever its layout:
    building (`from_models`), loading and saving, the tenants and switching between them, and
    `generate` with the tenant fixed per call or per row. A subclass lays out the modules
    (`view`, `add_tenant_modules`, `tenant_modules`) and runs the family's forward."""

    def __init__(self, config: MultiTenantConfigMixin):
        super().__init__(config)
        self.tenant_tokenizers: dict[str, PreTrainedTokenizerBase] = {}  # see `tokenizer_for`

    @classmethod
    def from_models(
        cls,
        models: Mapping[str, TenantSource],
        *,
        default_tenant: str | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        **shared_settings,
    ) -> MultiTenantForCausalLM:
        """Build losslessly from N fine-tunes of one MoE model, keyed by tenant name.

        Sources may be loaded models of a registered family (`multimoe.families`: its causal LM, or
        Switch's `ForConditionalGeneration`), local
        directories or Hub repo ids, in the family's v5 fused or legacy per-expert layout. The
        family comes from the sources (on a family's class, they must be of that family); the model
        returned is that family's class, e.g. `MultiTenantQwen3MoeForCausalLM`. Experts that are
        bit-identical across tenants in the same layer are stored once; every other tensor is kept
        per tenant. All sources are checked for compatibility before any weight is read.

        The model is built in `dtype`, else in the dtype the sources' weights are in (refused when
        they differ). `shared_settings` give the value of a setting one model applies to every
        tenant (`router_aux_loss_coef`, `output_router_logits`, `router_jitter_noise`,
        `attention_dropout`); without one, tenants that differ in it are refused. Each tenant keeps
        its own generation config (see `generation_configs`) and, where its source's directory has
        one, its own tokenizer and chat template (see `tokenizer_for`).
        """
        assembly = build_time("assembly")
        tenants = assembly.TenantSet.open(
            models,
            default_tenant=default_tenant,
            dtype=dtype,
            revision=revision,
            family=getattr(cls, "family", None),
            **shared_settings,
        )
        model_class = classes_for(tenants.family)[2]
        return model_class.from_assembly(tenants, *assembly.assemble_lossless(tenants))

    @classmethod
    def from_assembly(
        cls, tenants, config: MultiTenantConfigMixin, state_dict: dict[str, torch.Tensor]
    ) -> MultiTenantForCausalLM:
        """The model of an assembled config and state dict, with each tenant's own files from its
        source (`tenants`, a `multimoe.assembly.TenantSet`; see `take_tenant_files`), on the device
        the sources' weights lie on (assembly reads them on the CPU)."""
        model = cls.from_pretrained(None, config=config, state_dict=state_dict, dtype=config.dtype)
        model.take_tenant_files(tenants)
        return model if tenants.device.type == "cpu" else model.to(tenants.device)

    def take_tenant_files(self, tenants) -> None:
        """Keep, for each tenant of `tenants` (a `multimoe.assembly.TenantSet`), its source's
        generation config and, where the source has one, its tokenizer: when built or added."""
        self.generation_configs.update(tenants.generation_configs())
        self.tenant_tokenizers.update(tenants.tokenizers())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        """The strict loading of every multi-tenant class, plus each tenant's generation config
        (`tenants/<name>/generation_config.json`; a `generation_config=` given serves every tenant)
        and its tokenizer where one was saved (`tenants/<name>/tokenizer_config.json`, ...). On
        `MultiTenantForCausalLM` itself, the checkpoint's family picks the class."""
        if not hasattr(cls, "family"):
            return cls.family_class(pretrained_model_name_or_path, kwargs).from_pretrained(
                pretrained_model_name_or_path, *args, **kwargs
            )
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model
        if pretrained_model_name_or_path is not None:
            # The directory, or the Hub snapshot the strict loading fetched into the cache.
            checkpoint = resolve_directory(str(pretrained_model_name_or_path), owner=SAVED_CHECKPOINT, **kwargs)
            checkpoint = checkpoint / kwargs.get("subfolder", "")
            loaded.tenant_tokenizers = read_tenant_tokenizers(loaded, checkpoint)
            if kwargs.get("generation_config") is None:
                loaded.generation_configs = read_tenant_generation_configs(loaded, checkpoint)
        if kwargs.get("generation_config") is not None:
            loaded.generation_configs = {name: copy.deepcopy(kwargs["generation_config"]) for name in loaded.tenants}
        return model

    @staticmethod
    def family_class(pretrained_model_name_or_path, options: dict) -> type[MultiTenantForCausalLM]:
        """The multi-tenant class (with its head) a saved checkpoint (directory or Hub repo) is of."""
        if options.get("config") is not None:
            model_type = options["config"].model_type
        else:
            directory = resolve_directory(str(pretrained_model_name_or_path), owner=SAVED_CHECKPOINT, **options)
            model_type = read_json(directory / options.get("subfolder", "") / "config.json", owner=SAVED_CHECKPOINT)
            model_type = model_type.get("model_type")
        for family in FAMILIES.values():
            if family.multitenant_model_type == model_type:
                return classes_for(family)[2]
        hint = "build one with multimoe.from_models" if model_type in FAMILIES else "no registered family saves it"
        raise CheckpointError(
            f"{SAVED_CHECKPOINT}: {pretrained_model_name_or_path} holds a {model_type!r} model, not a multi-tenant one "
            f"({hint})."
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus a model card (README.md), made atomic: an
        interrupted save leaves the previous checkpoint in `save_directory` as it was (see
        `multimoe.saving.atomic_save_pretrained`)."""
        title = Path(os.path.abspath(save_directory)).name

        def save(directory, **options) -> None:
            super(MultiTenantLM, self).save_pretrained(directory, **options)
            if is_main_writer(options):
                if isinstance(self, FSDPModule) and self._auto_class is not None:
                    # The remote code transformers skipped (see `is_remote_code`): the unwrapped class's files.
                    custom_object_save(object.__new__(unwrapped_class(self)), directory, config=self.config)
                    self.config.save_pretrained(directory)
                for own in (self.generation_configs, self.tenant_tokenizers):  # each tenant's own files
                    for name, saved in own.items():
                        saved.save_pretrained(Path(directory, TENANTS_FOLDER, name))
                write_model_card(self, directory, title)

        def verify(directory: Path) -> None:
            check_saved_directory(directory, type(self), variant=kwargs.get("variant"))

        split = any(isinstance(parameter, DTensor) for parameter in self.parameters())  # by tensor, expert or FSDP plans
        atomic_save_pretrained(save, save_directory, verify=verify, every_rank=split, **kwargs)

    @classmethod
    def is_remote_code(cls) -> bool:
        # `fully_shard` makes the class `FSDP<class>`, defined in torch: its files are not the model's
        # code, so transformers must not copy them (`save_pretrained` copies the unwrapped class's).
        return not issubclass(cls, FSDPModule) and super().is_remote_code()

    def push_to_hub(self, repo_id: str, *, tokenizer=None, **kwargs):
        """Upload weights, config (with the tenant maps), remote code, the model card and, when
        given, the tokenizer, as one commit (see `multimoe.hub.push_to_hub`)."""
        return push_to_hub(self, repo_id, tokenizer=tokenizer, **kwargs)

    @property
    def _tied_weights_keys(self) -> dict[str, str]:
        # Tying is a per-tenant property recorded in the config, not one class-wide switch: a tied
        # tenant's copies of the family's tied names (its lm_head; Switch's stack embeddings too)
        # read its own embedding.
        family = self.family
        layer_paths = family.layer_paths(self.config)
        return {
            family.tenant_key(alias, name, layer_paths): family.tenant_key(target, name, layer_paths)
            for name, spec in self.config.tenants.items()
            if spec.get("tie_word_embeddings", False)
            for alias, target in family.model_class._tied_weights_keys.items()
        }

    def gather_sharded_state_dict_for_save(self, model_to_save, state_dict: dict, distributed_config, **options):
        """transformers' gathering of split weights; a tied tenant's head, gathered into a tensor of
        its own, is dropped as an untied model's would never be: the checkpoint stores its embedding once."""
        state_dict = super().gather_sharded_state_dict_for_save(model_to_save, state_dict, distributed_config, **options)
        if distributed_config is not None and state_dict:
            for alias in self._tied_weights_keys:
                state_dict.pop(alias, None)
        return state_dict

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict[str, str]:
        # The class-wide `config.tie_word_embeddings` switch does not apply; see `_tied_weights_keys`.
        return self._tied_weights_keys

    def init_parallel_plans(self) -> None:
        """transformers' plans, with the family's head rules (`lm_head`) addressing every tenant's head."""
        super().init_parallel_plans()
        self._tp_plan |= self.family.multitenant_plan(self.family.model_class._tp_plan, self.config.tenants)

    def take_family_settings(self) -> None:
        """The family's model's plain settings (`model_dim`, `router_aux_loss_coef`, ...), where its
        users read them: as attributes of the model with the head."""
        for key, value in vars(self.template).items():
            if not key.startswith("_") and isinstance(value, (bool, int, float)) and not hasattr(self, key):
                setattr(self, key, value)

    # -- tenants ------------------------------------------------------------------------------

    def build_views(self) -> None:
        """Build the views afresh (after the tenant set changed: a stale one would keep a removed
        tenant alive), ahead of any call (a compiled call cannot build one)."""
        self.model.build_views()
        self.views.clear()
        for tenant in (*self.tenants, None):
            self.view(tenant)

    @property
    def tenants(self) -> list[str]:
        return list(self.config.tenants)

    @property
    def active_model(self) -> str:
        return self.model.active_tenant

    def set_active_model(self, name: str) -> None:
        """Make `name` the tenant that calls without `tenant=` run as; copies nothing.

        Generations already running keep the tenant they started with.
        """
        self.model.active_tenant = self.model.known_tenant(name)

    @contextmanager
    def active(self, name: str) -> Iterator[MultiTenantForCausalLM]:
        """Run as `name` inside the block, in this thread or asyncio task only.

        Other threads keep their own tenant, so this is the safe way to switch in a server.
        """
        name = self.model.known_tenant(name)
        token = SCOPED_TENANTS.set(SCOPED_TENANTS.get() | {id(self.model): name})
        try:
            yield self
        finally:
            SCOPED_TENANTS.reset(token)

    def tokenizer_for(self, name: str, default: PreTrainedTokenizerBase | None = None) -> PreTrainedTokenizerBase:
        """Tenant `name`'s own tokenizer (fine-tunes differ in chat template and special tokens),
        else `default`: the tokenizer shared by tenants whose source had none."""
        tokenizer = self.tenant_tokenizers.get(self.model.known_tenant(name), default)
        if tokenizer is None:
            raise ValueError(
                f"No tokenizer is known for tenant {name!r}: its source had no tokenizer files; pass the shared "
                "tokenizer as default=."
            )
        return tokenizer

    def add_tenant(self, name: str, model_or_path: TenantSource, **options) -> None:
        """Add a tenant of the model's family in place. Its experts join the pool: each shares the
        closest entry within `threshold` (default 0: identical only; `similarity=` picks the weight
        metric) or gets a new one; with `delta_rank=<int>`, an expert that shares an entry it
        differs from keeps a low-rank delta of that rank (`multimoe.expert_deltas`). The other
        tenants' weights and outputs stay bit-identical.

        Calls running in other threads finish first and new ones wait (see `TenantLock`)."""
        with self.model.tenant_lock.writing():
            build_time("tenancy").add_tenant(self, name, model_or_path, **options)

    def remove_tenant(self, name: str) -> None:
        """Remove a tenant in place: its layers and every pool entry no other tenant reads.

        Calls running in other threads finish first and new ones wait (see `TenantLock`)."""
        with self.model.tenant_lock.writing():
            build_time("tenancy").remove_tenant(self, name)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """`PreTrainedModel.resize_token_embeddings` for every tenant at once, as it means for one
        model (the vocabulary size is one config field for all), while no call runs."""
        check_number("new_num_tokens", new_num_tokens, positive=True, integer=True, optional=True)
        check_number("pad_to_multiple_of", pad_to_multiple_of, positive=True, integer=True, optional=True)
        with self.model.tenant_lock.writing():
            return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    def _resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """Each tenant's embedding and lm_head in turn; returns the current tenant's embedding."""
        for name in self.tenants:
            with self.active(name):
                super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        return self.get_input_embeddings()

    def memory_report(self) -> MemoryReport:
        return MemoryReport.of(self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head[self.model.resolve_tenant(None)]

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head[self.model.resolve_tenant(None)] = new_embeddings

    @property
    def generation_config(self) -> GenerationConfig | None:
        """The generation settings of the tenant a call runs as now (see [`active`]); inside
        `generate`, those of that call's rows. Each tenant's are in `generation_configs`."""
        scoped = CALL_GENERATION_CONFIGS.get().get(id(self))
        if scoped is not None:
            return scoped
        return self.generation_configs[self.model.resolve_tenant(None)]

    @generation_config.setter
    def generation_config(self, value: GenerationConfig | None) -> None:
        # transformers sets it while constructing (then every tenant starts from it) and after
        # loading generation_config.json (then it is the current tenant's; see `from_pretrained`).
        if "model" not in self._modules:
            self.__dict__["generation_configs"] = {name: copy.deepcopy(value) for name in self.config.tenants}
        else:
            self.generation_configs[self.model.resolve_tenant(None)] = value

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *args,
        tenant: str | None = None,
        tenant_names: list[str] | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate`, with the tenant fixed when generation starts.

        `tenant="a"` runs every row as `a`; `tenant_names=[...]` gives one tenant per row (rows
        are expanded with their beams and return sequences). Without either, the current tenant
        (see [`active`] and [`set_active_model`]) is pinned for the whole generation.

        Without a `generation_config`, each row runs with its own tenant's generation settings
        (`generation_configs`): in a mixed batch each row stops at its own tenant's EOS, and a
        setting the batch's tenants disagree on must be passed (see `multimoe.generation`).
        """
        with self.model.tenant_lock.reading():  # names -> ids -> every forward: one tenant set
            if tenant_names is not None:
                if kwargs.get("tenant_ids") is not None:
                    raise ValueError("Name the tenant once: pass only one of tenant, tenant_names or tenant_ids.")
                kwargs["tenant_ids"] = self.model.tenant_ids(tenant_names, device=self.device)
            if kwargs.get("tenant_ids") is None:
                tenant = self.model.resolve_tenant(tenant)
            # The rows' own settings, under what the caller gives (transformers fills what a given
            # `generation_config` leaves unset from `self.generation_config`, then these).
            given = (generation_config.to_diff_dict() if generation_config is not None else {}) | kwargs
            call_config, stopping = self._rows_generation(inputs, tenant, given)
            if stopping and kwargs.get("pad_token_id", 0) is None:  # per-row EOS pads finished rows
                kwargs["pad_token_id"] = call_config.pad_token_id
            kwargs["stopping_criteria"] = StoppingCriteriaList([*stopping, *(kwargs.get("stopping_criteria") or [])])
            token = CALL_GENERATION_CONFIGS.set(CALL_GENERATION_CONFIGS.get() | {id(self): call_config})
            try:
                # Whatever is named goes on to every forward, whose `route` refuses a tenant named twice.
                return super().generate(inputs, generation_config, *args, tenant=tenant, **kwargs)
            finally:
                CALL_GENERATION_CONFIGS.reset(token)

    def _rows_generation(self, inputs, tenant: str | None, given: dict) -> tuple[GenerationConfig, list]:
        """The generation config and extra stopping criteria of a `generate` call, from its rows'
        tenants (see `multimoe.generation.generation_for_rows`)."""
        rows = next((given[key] for key in ("input_ids", "inputs_embeds") if given.get(key) is not None), inputs)
        batch_size = 1 if rows is None else rows.shape[0]
        routing = self.model.route(batch_size, tenant=tenant, tenant_ids=given.get("tenant_ids"))
        return generation_for_rows(self.generation_configs, routing.row_tenants, given)


class MultiTenantForCausalLM(MultiTenantLM):
    """Several fine-tunes of one MoE model in one causal LM: a shared expert pool per sparse layer and
    each tenant's own other layers. Every registered family has its class (`MultiTenantMixtralForCausalLM`,
    `MultiTenantQwen3MoeForCausalLM`, ...).

    Build it with [`from_models`], pick a tenant with [`set_active_model`] (or per call with
    `tenant=`), and use it like any causal LM: `generate`, `pipeline("text-generation")`,
    `save_pretrained` / `from_pretrained`.
    """
    def __init__(self, config: MultiTenantConfigMixin):
        super().__init__(config)
        unregistered(self, template=meta_template(self.family.model_class, config), views={})
        self.model = self.base_model_class_for_family(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.ModuleDict({name: self.fresh_head() for name in config.tenants})
        self.take_family_settings()
        self.post_init()
        self.build_views()

    base_model_class_for_family: type[MultiTenantModel]

    def view(self, tenant: str | None) -> nn.Module:
        """The family's causal LM running tenant `tenant`'s modules (`None`: a mixed batch's)."""
        model = self.model.view(tenant)
        view = self.views.get(tenant)
        head = RowDispatch(self.lm_head) if tenant is None else self.lm_head[tenant]
        if view is None or view.model is not model or (tenant is not None and view.lm_head is not head):
            view = self.views[tenant] = view_of(self.template, model=model, lm_head=head)
        view.training = self.training
        return view

    def fresh_head(self) -> nn.Module:
        return fresh_copy(self.template.lm_head, self.config)

    def add_tenant_modules(self, name: str) -> None:
        """Register new, uninitialised modules for tenant `name` (already in the config)."""
        for layer, template in zip(self.model.layers, self.model.template.layers):
            layer.tenants[name] = layer.tenant_layer(template, name)
        self.model.embed_tokens[name] = self.model.tenant_embedding(name)
        self.model.norm[name] = self.model.fresh("norm")
        self.lm_head[name] = self.fresh_head()

    def tenant_modules(self, name: str) -> dict[str, nn.Module]:
        """Every module that belongs to tenant `name` alone, keyed by qualified name, in a fixed
        order (embedding, final norm, lm_head, then one entry per layer)."""
        name = self.model.known_tenant(name)
        modules = {
            f"model.embed_tokens.{name}": self.model.embed_tokens[name],
            f"model.norm.{name}": self.model.norm[name],
            f"lm_head.{name}": self.lm_head[name],
        }
        for layer_idx, layer in enumerate(self.model.layers):
            modules[f"model.layers.{layer_idx}.tenants.{name}"] = layer.tenants[name]
        return modules

    # -- forward ------------------------------------------------------------------------------

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        *,
        tenant: str | None = None,
        tenant_names: list[str] | None = None,
        tenant_ids: torch.LongTensor | None = None,
        **kwargs,
    ):
        r"""
        The family's own causal-LM forward (the same arguments and outputs), plus the tenant
        arguments below. The family's usual arguments are named in the signature because `generate`
        reads it: it passes the position ids of left-padded rows, an attention mask and
        `logits_to_keep` only to a forward that names them, as the family's own forward does.

        tenant (`str`, *optional*):
            The tenant every row runs as; defaults to the current one (see [`active`]). Naming it
            per call leaves the model's state untouched, so concurrent callers can serve different
            tenants.
        tenant_names (`list[str]`, *optional*):
            One tenant per row: a mixed-tenant batch. Each row gets its own tenant's embeddings,
            attention, norms, router and lm_head; the shared expert pool runs once for all rows.
        tenant_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            The same as `tenant_names`, as indices into [`tenants`].
        """
        routing = self.model.route_inputs(input_ids, inputs_embeds, tenant, tenant_names, tenant_ids)
        if kwargs.get("output_router_logits") is None:
            kwargs["output_router_logits"] = getattr(self.config, "output_router_logits", None)
        inputs = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
            labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep,
        )
        return self.model.run(self.view(routing.tenant), routing, **inputs, **kwargs)


# -- one set of classes per family -------------------------------------------------------------


def multitenant_classes(family: Family) -> tuple[type, type, type]:
    """`MultiTenant<Stem>PreTrainedModel`, `MultiTenant<Stem>Model` and `MultiTenant<Stem>ForCausalLM`
    (`...ForConditionalGeneration` for an encoder-decoder family, from `multimoe.modeling_seq2seq`)
    of `family`: the generic classes, on top of the family's own `PreTrainedModel`."""
    stem, config_class = family.class_stem, config_class_for(family)
    family_pretrained = family.base_model_class.__bases__[0]

    def define(name: str, bases: tuple, doc: str | None, **attributes) -> type:
        namespace = {"__module__": __name__, "__qualname__": name, "__doc__": doc} | attributes
        return type(name, bases, namespace)

    recorders = family.output_recorders | {"hidden_states": MultiTenantDecoderLayer}
    pretrained = define(
        f"MultiTenant{stem}PreTrainedModel",
        (MultiTenantPreTrainedModel, family_pretrained),
        MultiTenantPreTrainedModel.__doc__,
        config_class=config_class,
        family=family,
        _can_record_outputs=recorders,
    )
    if family.is_encoder_decoder:
        from .modeling_seq2seq import MultiTenantForConditionalGeneration, MultiTenantSeq2SeqModel

        base_class, head_class, head_suffix = MultiTenantSeq2SeqModel, MultiTenantForConditionalGeneration, "ForConditionalGeneration"
    else:
        base_class, head_class, head_suffix = MultiTenantModel, MultiTenantForCausalLM, "ForCausalLM"
    base = define(f"MultiTenant{stem}Model", (base_class, pretrained), base_class.__doc__)
    causal = define(
        f"MultiTenant{stem}{head_suffix}", (head_class, pretrained), head_class.__doc__, base_model_class_for_family=base
    )
    conversions = [WeightRenaming(saved, current) for saved, current in family.saved_renames]
    if family.config_class.base_model_ep_plan:  # pools are split by experts: padded on load if uneven
        conversions.append(pool_padding_converter())
    if conversions:
        register_checkpoint_conversion_mapping(family.multitenant_model_type, conversions, overwrite=True)
    return pretrained, base, causal


MODEL_CLASSES: dict[str, tuple[type, type, type]] = {}


def classes_for(family: Family) -> tuple[type, type, type]:
    """The multi-tenant (pretrained, base, head) classes of `family`, made once and kept as
    module attributes (the names a checkpoint's `auto_map` gives)."""
    if family.model_type not in MODEL_CLASSES:
        MODEL_CLASSES[family.model_type] = multitenant_classes(family)
        for model_class in MODEL_CLASSES[family.model_type]:
            globals()[model_class.__name__] = model_class
    return MODEL_CLASSES[family.model_type]


for _family in list(FAMILIES.values()):
    classes_for(_family)
del _family
MultiTenantMixtralPreTrainedModel, MultiTenantMixtralModel, MultiTenantMixtralForCausalLM = MODEL_CLASSES["mixtral"]


__all__ = [
    "MODEL_CLASSES",
    "classes_for",
    "MultiTenantDecoderLayer",
    "MultiTenantForCausalLM",
    "MultiTenantMixtralForCausalLM",
    "MultiTenantMixtralModel",
    "MultiTenantMixtralPreTrainedModel",
    "MultiTenantModel",
    "MultiTenantPreTrainedModel",
    "TenantExperts",
]
