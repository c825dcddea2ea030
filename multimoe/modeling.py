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

from collections.abc import Mapping

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.mixtral.modeling_mixtral import (
    MixtralAttention,
    MixtralExperts,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
    MixtralTopKRouter,
    load_balancing_loss_func,
)
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .checkpoints import CheckpointError, TenantSource
from .configuration import MultiTenantMixtralConfig
from .memory import MemoryReport


class UnknownTenantError(ValueError):
    """A tenant name that the model does not hold."""


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
    """A Mixtral decoder layer whose attention, norms and router are chosen per call by tenant name."""

    def __init__(self, config: MultiTenantMixtralConfig, layer_idx: int):
        super().__init__()
        self.jitter_noise = config.router_jitter_noise
        self.experts = SharedExpertPool(config, config.pool_sizes[layer_idx])
        self.tenants = nn.ModuleDict({name: TenantLayer(config, layer_idx, name) for name in config.tenants})

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        tenant: str,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        own = self.tenants[tenant]
        residual = hidden_states
        hidden_states = own.input_layernorm(hidden_states)
        hidden_states, _ = own.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = own.post_attention_layernorm(hidden_states)
        shape = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        hidden_states = hidden_states.view(-1, shape[-1])
        _, top_k_weights, top_k_index = own.router(hidden_states)
        hidden_states = self.experts(hidden_states, torch.take(own.expert_map, top_k_index), top_k_weights)
        return residual + hidden_states.reshape(shape)


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
        self.post_init()

    def resolve_tenant(self, tenant: str | None) -> str:
        """The tenant a call runs as: the one it names, else the active one."""
        name = self.active_tenant if tenant is None else tenant
        if name not in self.embed_tokens:
            raise UnknownTenantError(f"Unknown tenant {name!r}; known tenants: {list(self.embed_tokens)}.")
        return name

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens[self.active_tenant]

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens[self.active_tenant] = value

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
        **kwargs,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        tenant = self.resolve_tenant(tenant)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens[tenant](input_ids)
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
                tenant=tenant,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm[tenant](hidden_states)
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
        dtype: torch.dtype | None = None,
        revision: str | None = None,
    ) -> MultiTenantMixtralForCausalLM:
        """Build losslessly from N Mixtral checkpoints keyed by tenant name.

        Sources may be loaded `MixtralForCausalLM`s, local directories or Hub repo ids, in the legacy
        per-expert or the v5 fused layout. Experts that are bit-identical across tenants in the same
        layer are stored once; every other tensor is kept per tenant. All sources are checked for
        compatibility before any weight is read.
        """
        from .assembly import assemble_lossless

        config, state_dict = assemble_lossless(models, default_tenant=default_tenant, dtype=dtype, revision=revision)
        return cls.from_pretrained(None, config=config, state_dict=state_dict, dtype=config.dtype)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but a checkpoint that lacks or adds tensors is refused.

        transformers would initialise a missing tensor at random with a warning; for a tenant that
        means silently serving noise, so it is an error here.
        """
        wants_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        for problem in ("missing_keys", "unexpected_keys"):
            keys = sorted(loading_info[problem])
            if keys:
                raise CheckpointError(
                    f"The checkpoint does not match its config: {problem.replace('_', ' ')} {keys[:5]}"
                    f"{' and more' if len(keys) > 5 else ''}."
                )
        return (model, loading_info) if wants_loading_info else model

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
        """Make `name` the tenant that calls without `tenant=` run as; copies nothing."""
        self.model.active_tenant = self.model.resolve_tenant(name)

    def memory_report(self) -> MemoryReport:
        return MemoryReport.of(self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head[self.active_model]

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head[self.active_model] = new_embeddings

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
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        r"""
        tenant (`str`, *optional*):
            The tenant this call runs as; defaults to [`active_model`]. Naming it per call leaves
            the model's state untouched, so concurrent callers can serve different tenants.
        """
        tenant = self.model.resolve_tenant(tenant)
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
            tenant=tenant,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head[tenant](hidden_states)

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
    "UnknownTenantError",
]
