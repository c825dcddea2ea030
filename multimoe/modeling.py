"""`MultiTenantMixtralForCausalLM`: one shared expert pool per layer, each tenant's own other layers.

Layout (state-dict names mirror Mixtral's with the tenant inserted):

    model.embed_tokens.<tenant>                      per-tenant nn.Embedding
    model.layers.<l>.experts                         SharedExpertPool, P_l experts, all tenants
    model.layers.<l>.tenants.<tenant>.self_attn      per-tenant MixtralAttention
    model.layers.<l>.tenants.<tenant>.input_layernorm / post_attention_layernorm / router
    model.norm.<tenant>, lm_head.<tenant>            per-tenant final norm and output head

Every module is registered exactly once. A forward resolves its tenant name once and then indexes
the per-tenant containers by that name, so switching tenants only changes a string: nothing is
re-pointed, copied or registered twice, and the cost does not depend on model size.
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel, StoppingCriteriaList
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.mixtral.modeling_mixtral import (
    MixtralAttention,
    MixtralExperts,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
    MixtralTopKRouter,
    apply_rotary_pos_emb,
    eager_attention_forward,
    load_balancing_loss_func,
)
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .checkpoints import (
    SAVED_CHECKPOINT,
    CheckpointError,
    TenantSource,
    check_saved_directory,
    resolve_directory,
    strict_from_pretrained,
)
from .concurrency import TenantLock
from .configuration import MultiTenantMixtralConfig
from .generation import generation_for_rows
from .hub import push_to_hub, write_model_card
from .memory import MemoryReport
from .routing import CALL_GENERATION_CONFIGS, SCOPED_TENANTS, TenantRouting, UnknownTenantError, claim_cache
from .saving import atomic_save_pretrained
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


# Each tenant's own files (its generation config) lie in `tenants/<name>/` of a checkpoint.
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


@use_experts_implementation
class SharedExpertPool(nn.Module):
    """One layer's experts, stored once for every tenant, in the v5 fused layout.

    Indices reaching it are pool indices (already mapped from a tenant's local experts), so
    transformers' experts implementations (`grouped_mm`, `batched_mm`, `eager`) run it unchanged.
    """

    def __init__(self, config: MultiTenantMixtralConfig, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    # The eager path is Mixtral's own loop over experts; it reads `self.num_experts`, the pool size.
    forward = MixtralExperts.forward.__wrapped__


def rows_rms_norm(routing: TenantRouting, hidden_states: torch.Tensor, norms: list[MixtralRMSNorm]) -> torch.Tensor:
    """`MixtralRMSNorm` with each row's own tenant's weight (`norms` in the model's tenant order),
    in one pass over a mixed batch: the same arithmetic, so the same values as applying each
    tenant's norm to its rows, in a handful of ops whatever the number of tenants."""
    weight = routing.per_row([norm.weight for norm in norms])
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + norms[0].variance_epsilon)
    return weight[:, None, :] * hidden_states.to(input_dtype)


class TenantLayer(nn.Module):
    """One tenant's own share of a decoder layer, and the map from its local experts to the pool."""

    def __init__(self, config: MultiTenantMixtralConfig, layer_idx: int, tenant: str):
        super().__init__()
        self.tenant = tenant
        self.layer_idx = layer_idx
        self.self_attn = MixtralAttention(config, layer_idx)
        self.input_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.router = MixtralTopKRouter(config)
        self.register_buffer("expert_map", self.expert_map_from(config), persistent=False)

    def expert_map_from(self, config: MultiTenantMixtralConfig) -> torch.Tensor:
        return torch.tensor(config.expert_map(self.tenant, self.layer_idx), dtype=torch.long)


class MultiTenantMixtralDecoderLayer(GradientCheckpointingLayer):
    """A Mixtral decoder layer whose attention, norms and router are chosen per row by tenant.

    A one-tenant batch runs that tenant's modules exactly as Mixtral does. A mixed batch runs the
    per-tenant matrix products (q/k/v/o projections, router logits) per tenant group and
    everything else once for the whole batch, each row with its own tenant's weights. Either way
    all rows, whatever their tenant, go through the shared expert pool in one call.
    """

    def __init__(self, config: MultiTenantMixtralConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.jitter_noise = config.router_jitter_noise
        self.experts = SharedExpertPool(config, config.pool_sizes[layer_idx])
        self.tenants = nn.ModuleDict({name: TenantLayer(config, layer_idx, name) for name in config.tenants})

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        routing: TenantRouting,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attention_inputs = dict(
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        residual = hidden_states
        if routing.is_mixed:
            hidden_states = self.rows_norm(routing, hidden_states, "input_layernorm")
            hidden_states = residual + self.mixed_attention(hidden_states, routing, **attention_inputs)
            residual = hidden_states
            hidden_states = self.jitter(self.rows_norm(routing, hidden_states, "post_attention_layernorm"))
            top_k_weights, pool_index = self.mixed_route(routing, hidden_states)
        else:
            own = self.tenants[routing.groups[0][0]]
            hidden_states, _ = own.self_attn(own.input_layernorm(hidden_states), **attention_inputs)
            hidden_states = residual + hidden_states
            residual = hidden_states
            hidden_states = self.jitter(own.post_attention_layernorm(hidden_states))
            _, top_k_weights, top_k_index = own.router(hidden_states)
            pool_index = torch.take(own.expert_map, top_k_index)
        shape = hidden_states.shape
        hidden_states = self.experts(
            hidden_states.view(-1, shape[-1]),
            pool_index.reshape(-1, pool_index.shape[-1]),
            top_k_weights.reshape(-1, top_k_weights.shape[-1]),
        )
        return residual + hidden_states.reshape(shape)

    def jitter(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Mixtral's multiplicative router jitter, in training only."""
        if self.training and self.jitter_noise > 0:
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return hidden_states

    def rows_norm(self, routing: TenantRouting, hidden_states: torch.Tensor, which: str) -> torch.Tensor:
        """This layer's `which` norm, each row with its own tenant's weight."""
        return rows_rms_norm(routing, hidden_states, [getattr(own, which) for own in self.tenants.values()])

    def mixed_route(self, routing: TenantRouting, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`MixtralTopKRouter` for a mixed batch: logits with each row's tenant's router, then one
        softmax / top-k for all rows; each row's tenant map turns local experts into pool entries."""
        logits = routing.map_rows(lambda name, rows: F.linear(rows, self.tenants[name].router.weight), hidden_states)
        probabilities = F.softmax(logits.float(), dim=-1)
        top_k_weights, top_k_index = torch.topk(probabilities, self.config.num_experts_per_tok, dim=-1)
        top_k_weights /= top_k_weights.sum(dim=-1, keepdim=True)
        maps = routing.per_row([own.expert_map for own in self.tenants.values()])
        pool_index = torch.gather(maps, 1, top_k_index.flatten(1)).view_as(top_k_index)
        return top_k_weights, pool_index

    def mixed_attention(
        self,
        hidden_states: torch.Tensor,
        routing: TenantRouting,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`MixtralAttention.forward` for a batch whose rows belong to different tenants. Only the
        projections are per tenant; rotary embedding, the cache update and the attention kernel
        run once for the whole batch, so the KV cache stays one batch-shaped object."""
        kwargs.pop("position_ids", None)
        attention = next(iter(self.tenants.values())).self_attn  # shape constants, shared by all tenants
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, attention.head_dim)

        def project(name: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            own = self.tenants[name].self_attn
            return own.q_proj(rows), own.k_proj(rows), own.v_proj(rows)

        query, key, value = (
            states.view(hidden_shape).transpose(1, 2) for states in routing.map_rows(project, hidden_states)
        )
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention_function(
            attention,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else attention.attention_dropout,
            scaling=attention.scaling,
            sliding_window=getattr(self.config, "sliding_window", None),
            **kwargs,
        )
        output = output.reshape(*input_shape, -1).contiguous()
        return routing.map_rows(lambda name, rows: self.tenants[name].self_attn.o_proj(rows), output)


class MultiTenantMixtralPreTrainedModel(PreTrainedModel):
    config_class = MultiTenantMixtralConfig
    config: MultiTenantMixtralConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MultiTenantMixtralDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(MixtralTopKRouter, index=0),
        "hidden_states": MultiTenantMixtralDecoderLayer,
        "attentions": MixtralAttention,
    }

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing what would silently serve the wrong weights.

        transformers would initialise a missing or misshapen tensor at random, cast an integer
        tensor to float, keep NaN values and fall back to pickle; here each is a `CheckpointError`
        naming the file, tensor or key (see `multimoe.checkpoints.strict_from_pretrained`).
        """
        return strict_from_pretrained(super().from_pretrained, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        # Calls see the tenant set whole: an edit in another thread waits (see `TenantLock`). A
        # compiled call runs inside `generate` or its caller's own synchronisation: locks do not trace.
        if torch.compiler.is_compiling():
            return super().__call__(*args, **kwargs)
        with self.base_model.tenant_lock.reading():
            return super().__call__(*args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SharedExpertPool):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, MixtralTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, TenantLayer):
            init.copy_(module.expert_map, module.expert_map_from(self.config))


class MultiTenantMixtralModel(MultiTenantMixtralPreTrainedModel):
    """The decoder stack: per-tenant embeddings and final norms around the multi-tenant layers."""

    def __init__(self, config: MultiTenantMixtralConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.ModuleDict(
            {name: nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx) for name in config.tenants}
        )
        self.layers = nn.ModuleList(
            [MultiTenantMixtralDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = nn.ModuleDict(
            {name: MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps) for name in config.tenants}
        )
        self.rotary_emb = MixtralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.active_tenant = config.default_tenant
        self.tenant_lock = TenantLock()
        self.post_init()

    @property
    def tenant_names(self) -> list[str]:
        return list(self.embed_tokens)

    def resolve_tenant(self, tenant: str | None) -> str:
        """The tenant a call runs as: the one it names, else the innermost `active()` block's, else
        the active tenant."""
        name = tenant if tenant is not None else SCOPED_TENANTS.get().get(id(self), self.active_tenant)
        return self.known_tenant(name)

    def known_tenant(self, name: str) -> str:
        """`name` itself if this model holds that tenant; `None` never names one."""
        if name is None:
            raise UnknownTenantError(f"Name a tenant: got None; known tenants: {self.tenant_names}.")
        if not isinstance(name, str) or name not in self.embed_tokens:
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

    def route(
        self,
        batch_size: int,
        tenant: str | None = None,
        tenant_names: list[str] | None = None,
        tenant_ids: torch.LongTensor | None = None,
    ) -> TenantRouting:
        """Resolve, once per call, which tenant each row runs as."""
        if sum(value is not None for value in (tenant, tenant_names, tenant_ids)) > 1:
            raise ValueError("Name the tenant once: pass only one of tenant, tenant_names or tenant_ids.")
        if batch_size == 0:
            raise ValueError("The batch has no rows: give at least one input row.")
        if tenant_names is not None:
            tenant_ids = self.tenant_ids(tenant_names)
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
        return TenantRouting.from_ids(tenant_ids, self.tenant_names)

    def get_input_embeddings(self) -> nn.Embedding:
        """The current tenant's embedding (see `resolve_tenant`), so `inputs_embeds` built from it
        match what a call without `tenant=` runs as."""
        return self.embed_tokens[self.resolve_tenant(None)]

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens[self.resolve_tenant(None)] = value

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        tenant: str | None = None,
        tenant_names: list[str] | None = None,
        tenant_ids: torch.LongTensor | None = None,
        routing: TenantRouting | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if routing is None:
            routing = self.route(batch_size, tenant=tenant, tenant_names=tenant_names, tenant_ids=tenant_ids)
        if routing.is_mixed and (kwargs.get("output_router_logits") or kwargs.get("output_attentions")):
            raise ValueError(
                "output_router_logits and output_attentions are per tenant: run a mixed-tenant batch one tenant "
                "per call to get them."
            )

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None and not torch.compiler.is_compiling():  # a compiled call: see `generate`
            claim_cache(cache, routing)
        if inputs_embeds is None:
            inputs_embeds = routing.map_rows(lambda name, rows: self.embed_tokens[name](rows), input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        causal_mask = mask_function(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                routing=routing,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        if routing.is_mixed:
            hidden_states = rows_rms_norm(routing, hidden_states, [self.norm[name] for name in self.tenant_names])
        else:
            hidden_states = self.norm[routing.groups[0][0]](hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class MultiTenantMixtralForCausalLM(MultiTenantMixtralPreTrainedModel, GenerationMixin):
    """Several Mixtral fine-tunes in one model: a shared expert pool and per-tenant other layers.

    Build it with [`from_models`], pick a tenant with [`set_active_model`] (or per call with
    `tenant=`), and use it like any causal LM: `generate`, `pipeline("text-generation")`,
    `save_pretrained` / `from_pretrained`.
    """

    def __init__(self, config: MultiTenantMixtralConfig):
        super().__init__(config)
        self.model = MultiTenantMixtralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.ModuleDict(
            {name: nn.Linear(config.hidden_size, config.vocab_size, bias=False) for name in config.tenants}
        )
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_models(
        cls,
        models: Mapping[str, TenantSource],
        *,
        default_tenant: str | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        **shared_settings,
    ) -> MultiTenantMixtralForCausalLM:
        """Build losslessly from N Mixtral checkpoints keyed by tenant name.

        Sources may be loaded `MixtralForCausalLM`s, local directories or Hub repo ids, in the legacy
        per-expert or the v5 fused layout. Experts that are bit-identical across tenants in the same
        layer are stored once; every other tensor is kept per tenant. All sources are checked for
        compatibility before any weight is read.

        The model is built in `dtype`, else in the dtype the sources' weights are in (refused when
        they differ). `shared_settings` give the value of a setting one model applies to every
        tenant (`router_aux_loss_coef`, `output_router_logits`, `router_jitter_noise`,
        `attention_dropout`); without one, tenants that differ in it are refused. Each tenant keeps
        its own generation config (see `generation_configs`).
        """
        assembly = build_time("assembly")
        tenants = assembly.TenantSet.open(
            models, default_tenant=default_tenant, dtype=dtype, revision=revision, **shared_settings
        )
        return cls.from_assembly(tenants, *assembly.assemble_lossless(tenants))

    @classmethod
    def from_assembly(
        cls, tenants, config: MultiTenantMixtralConfig, state_dict: dict[str, torch.Tensor]
    ) -> MultiTenantMixtralForCausalLM:
        """The model of an assembled config and state dict, with each tenant's generation config
        from its source (`tenants`, a `multimoe.assembly.TenantSet`)."""
        model = cls.from_pretrained(None, config=config, state_dict=state_dict, dtype=config.dtype)
        model.generation_configs = tenants.generation_configs()
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        """The strict loading of every multi-tenant class, plus each tenant's generation config
        (`tenants/<name>/generation_config.json`); a `generation_config=` given serves every tenant."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model
        if kwargs.get("generation_config") is not None:
            loaded.generation_configs = {name: copy.deepcopy(kwargs["generation_config"]) for name in loaded.tenants}
        elif pretrained_model_name_or_path is not None:
            # The directory, or the Hub snapshot the strict loading fetched into the cache.
            checkpoint = resolve_directory(str(pretrained_model_name_or_path), owner=SAVED_CHECKPOINT, **kwargs)
            loaded.generation_configs = read_tenant_generation_configs(loaded, checkpoint / kwargs.get("subfolder", ""))
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus a model card (README.md), made atomic: an
        interrupted save leaves the previous checkpoint in `save_directory` as it was (see
        `multimoe.saving.atomic_save_pretrained`)."""
        title = Path(os.path.abspath(save_directory)).name

        def save(directory, **options) -> None:
            super(MultiTenantMixtralForCausalLM, self).save_pretrained(directory, **options)
            if options.get("is_main_process", True):
                for name, generation_config in self.generation_configs.items():
                    generation_config.save_pretrained(Path(directory, TENANTS_FOLDER, name))
                write_model_card(self, directory, title)

        def verify(directory: Path) -> None:
            check_saved_directory(directory, type(self), variant=kwargs.get("variant"))

        atomic_save_pretrained(save, save_directory, verify=verify, **kwargs)

    def push_to_hub(self, repo_id: str, *, tokenizer=None, **kwargs):
        """Upload weights, config (with the tenant maps), remote code, the model card and, when
        given, the tokenizer, as one commit (see `multimoe.hub.push_to_hub`)."""
        return push_to_hub(self, repo_id, tokenizer=tokenizer, **kwargs)

    @property
    def _tied_weights_keys(self) -> dict[str, str]:
        # Tying is a per-tenant property recorded in the config, not one class-wide switch.
        return {
            f"lm_head.{name}.weight": f"model.embed_tokens.{name}.weight"
            for name, spec in self.config.tenants.items()
            if spec.get("tie_word_embeddings", False)
        }

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict[str, str]:
        # The class-wide `config.tie_word_embeddings` switch does not apply; see `_tied_weights_keys`.
        return self._tied_weights_keys

    # -- tenants ------------------------------------------------------------------------------

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
    def active(self, name: str) -> Iterator[MultiTenantMixtralForCausalLM]:
        """Run as `name` inside the block, in this thread or asyncio task only.

        Other threads keep their own tenant, so this is the safe way to switch in a server.
        """
        name = self.model.known_tenant(name)
        token = SCOPED_TENANTS.set(SCOPED_TENANTS.get() | {id(self.model): name})
        try:
            yield self
        finally:
            SCOPED_TENANTS.reset(token)

    def add_tenant(self, name: str, model_or_path: TenantSource, **options) -> None:
        """Add a Mixtral tenant in place. Its experts join the pool: each shares the closest entry
        within `threshold` (default 0: identical only; `similarity=` picks the weight metric) or
        gets a new one. The other tenants' weights and outputs stay bit-identical.

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

    # -- forward ------------------------------------------------------------------------------

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        tenant: str | None = None,
        tenant_names: list[str] | None = None,
        tenant_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        r"""
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
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        routing = self.model.route(batch_size, tenant=tenant, tenant_names=tenant_names, tenant_ids=tenant_ids)
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            routing=routing,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = routing.map_rows(lambda name, rows: self.lm_head[name](rows), hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, self.num_experts, self.num_experts_per_tok, attention_mask
            )
            if labels is not None:
                loss += self.router_aux_loss_coef * aux_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


__all__ = [
    "MultiTenantMixtralForCausalLM",
    "MultiTenantMixtralModel",
    "MultiTenantMixtralPreTrainedModel",
    "SharedExpertPool",
]
