"""Multi-tenant encoder-decoder models (Switch Transformers): the layout of `multimoe.modeling`
applied to both stacks.

Layout (state-dict names are the family's, under `model.`, with the tenant inserted):

    model.shared.<tenant>                             the tenant's input embedding
    model.<stack>.embed_tokens.<tenant>               its stack embeddings (tied to `shared` when it ties)
    model.<stack>.block.<i>.experts                   the pool of a sparse block, stored once for all tenants
    model.<stack>.block.<i>.tenants.<tenant>          the tenant's own block, of the family's class
    model.<stack>.final_layer_norm.<tenant>           its final norms
    lm_head.<tenant>                                  its output head

`<stack>` is `encoder` or `decoder`; layers are numbered on across them (the encoder's blocks, then
the decoder's) in the config's `pool_sizes` and expert maps. A call runs the family's own
`ForConditionalGeneration` code on a view, as the causal models do; `generate` runs the encoder
through `get_encoder()`, which takes the same tenant arguments as `forward`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration import MultiTenantConfigMixin
from .modeling import (
    LayerCall,
    MultiTenantDecoderLayer,
    MultiTenantLM,
    MultiTenantPreTrainedModel,
    RowDispatch,
    TenantRouter,
    fresh_copy,
    meta_template,
    unregistered,
    view_of,
)
from .routing import TenantRouting


def holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def tenant_copies(template: nn.Module, config: MultiTenantConfigMixin) -> nn.ModuleDict:
    """One uninitialised copy of `template` (built on the meta device) per tenant."""
    return nn.ModuleDict({name: fresh_copy(template, config) for name in config.tenants})


def add_tenant_copies(owner: nn.Module, children: list[str], name: str) -> None:
    """A new tenant's uninitialised copy of each per-tenant child of `owner` (a stack or model
    holding its family `template` and `config`)."""
    for child in children:
        getattr(owner, child)[name] = fresh_copy(owner.template.get_submodule(child), owner.config)


def picker(tenant: str | None):
    """How a view takes a per-tenant module from its `ModuleDict`: the tenant's own, or for a
    mixed batch (`None`) a `RowDispatch` over every tenant's."""
    return RowDispatch if tenant is None else (lambda owner: owner[tenant])


class MultiTenantStack(nn.Module):
    """One stack (encoder or decoder) of every tenant: its layers, each holding its pool and every
    tenant's own block, and each tenant's own other modules (stack embedding, final norm). Modules
    of the family's stack without weights (dropout) are the template's, shared by every view."""

    def __init__(self, config: MultiTenantConfigMixin, template: nn.Module, first_layer: int):
        super().__init__()
        unregistered(self, template=template, config=config)
        self.layer_list = config.family.layer_list
        blocks = getattr(template, self.layer_list)
        layers = [MultiTenantDecoderLayer(config, first_layer + index, block) for index, block in enumerate(blocks)]
        setattr(self, self.layer_list, nn.ModuleList(layers))
        self.own = [name for name, child in template.named_children() if name != self.layer_list and holds_tensors(child)]
        for name in self.own:
            setattr(self, name, tenant_copies(template.get_submodule(name), config))

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self, self.layer_list)

    def view(self, tenant: str | None) -> nn.Module:
        """The family's stack running tenant `tenant`'s modules (`None`: a mixed batch's)."""
        pick = picker(tenant)
        children = {name: pick(getattr(self, name)) for name in self.own}
        children[self.layer_list] = nn.ModuleList([LayerCall(layer, tenant) for layer in self.layers])
        return view_of(self.template, **children)

    def tenant_modules(self, prefix: str, name: str) -> dict[str, nn.Module]:
        modules = {f"{prefix}.{own}.{name}": getattr(self, own)[name] for own in self.own}
        for index, layer in enumerate(self.layers):
            modules[f"{prefix}.{self.layer_list}.{index}.tenants.{name}"] = layer.tenants[name]
        return modules

    def add_tenant_modules(self, name: str) -> None:
        add_tenant_copies(self, self.own, name)
        for layer in self.layers:
            layer.tenants[name] = layer.tenant_layer(layer.template, name)


class TenantEncoder(nn.Module):
    """The encoder as `generate` calls it (`get_encoder()`): the rows' tenants' encoders, taking
    the same tenant arguments as the model's forward."""

    def __init__(self, model: MultiTenantSeq2SeqModel):
        super().__init__()
        unregistered(self, model=model)

    def forward(self, input_ids=None, tenant=None, tenant_names=None, tenant_ids=None, **kwargs):
        model = self.model
        routing = model.route_inputs(input_ids, kwargs.get("inputs_embeds"), tenant, tenant_names, tenant_ids)
        return model.run(model.view(routing.tenant).encoder, routing, input_ids=input_ids, **kwargs)


def call_rows(input_ids, kwargs: dict) -> torch.Tensor:
    """The input of an encoder-decoder call whose dim 0 holds its rows, whichever it has."""
    for rows in (input_ids, kwargs.get("inputs_embeds"), kwargs.get("decoder_input_ids"),
                 kwargs.get("decoder_inputs_embeds")):
        if rows is not None:
            return rows
    if kwargs.get("encoder_outputs") is not None:
        return kwargs["encoder_outputs"][0]
    raise ValueError("You must specify exactly one of input_ids or inputs_embeds (or encoder_outputs).")


class MultiTenantSeq2SeqModel(TenantRouter, MultiTenantPreTrainedModel):
    """The encoder-decoder of every tenant: each tenant's input embedding, both stacks, and the
    tenant routing."""

    def __init__(self, config: MultiTenantConfigMixin):
        super().__init__(config)
        template = meta_template(self.family.base_model_class, config)
        unregistered(self, template=template, views={})
        self.own, first_layer = [], 0
        for name, child in template.named_children():
            if name in self.family.stacks:
                setattr(self, name, MultiTenantStack(config, child, first_layer))
                first_layer += len(child.get_submodule(self.family.layer_list))
            elif holds_tensors(child):
                self.own.append(name)
                setattr(self, name, tenant_copies(child, config))
        self.embedding_name = next(name for name, child in template.named_children() if child is template.get_input_embeddings())
        self.start_serving(config)

    @property
    def tenant_embeddings(self) -> nn.ModuleDict:
        return getattr(self, self.embedding_name)

    @property
    def stacks(self) -> list[MultiTenantStack]:
        return [getattr(self, name) for name in self.family.stacks]

    @property
    def layers(self) -> list[MultiTenantDecoderLayer]:
        """Every layer, in the config's layer order (the encoder's, then the decoder's)."""
        return [layer for stack in self.stacks for layer in stack.layers]

    def view_children(self, tenant: str | None) -> dict[str, nn.Module]:
        pick = picker(tenant)
        children = {name: pick(getattr(self, name)) for name in self.own}
        children.update((name, getattr(self, name).view(tenant)) for name in self.family.stacks)
        return children

    def view(self, tenant: str | None) -> nn.Module:
        """The family's base model running tenant `tenant`'s modules (`None`: a mixed batch's)."""
        if tenant not in self.views:
            self.views[tenant] = view_of(self.template, **self.view_children(tenant))
        return train_as(self.views[tenant], self.training)

    def get_encoder(self, modality: str | None = None) -> TenantEncoder:
        return TenantEncoder(self)

    def add_tenant_modules(self, name: str) -> None:
        add_tenant_copies(self, self.own, name)
        for stack in self.stacks:
            stack.add_tenant_modules(name)

    def tenant_modules(self, name: str) -> dict[str, nn.Module]:
        modules = {f"model.{own}.{name}": getattr(self, own)[name] for own in self.own}
        for stack_name in self.family.stacks:
            modules.update(getattr(self, stack_name).tenant_modules(f"model.{stack_name}", name))
        return modules

    def forward(self, input_ids=None, tenant=None, tenant_names=None, tenant_ids=None, **kwargs):
        """The family's base-model forward, as tenant `tenant` (or one tenant per row)."""
        rows = call_rows(input_ids, kwargs)
        routing = self.route(rows.shape[0], tenant, tenant_names, tenant_ids, rows.device)
        return self.run(self.view(routing.tenant), routing, input_ids=input_ids, **kwargs)


def train_as(view: nn.Module, training: bool) -> nn.Module:
    """`view` in the model's mode: the family's weightless modules in it (dropout) are the
    template's, which only the view reaches."""
    if view.training != training:
        view.train(training)
    return view


class ScaledHead(nn.Module):
    """A tied tenant's lm_head as its family applies it: to hidden states scaled first (Switch:
    by `d_model ** -0.5`). The multi-tenant config never ties, so the family's code does not scale."""

    def __init__(self, head: nn.Module, scale: float):
        super().__init__()
        unregistered(self, head=head)
        self.scale = scale

    def forward(self, hidden_states):
        return self.head(hidden_states * self.scale)


class MultiTenantForConditionalGeneration(MultiTenantLM):
    """Several fine-tunes of one encoder-decoder MoE model in one model: a shared expert pool per
    sparse block, in encoder and decoder, and each tenant's own other modules. The family's class
    is `MultiTenantSwitchTransformersForConditionalGeneration`; use it as the family's model
    (`generate`, `save_pretrained`, `AutoModelForSeq2SeqLM.from_pretrained`), with `tenant=`,
    `tenant_names=[...]`, `set_active_model` and `active()` as in the causal models."""

    base_model_class_for_family: type[MultiTenantSeq2SeqModel]

    def __init__(self, config: MultiTenantConfigMixin):
        super().__init__(config)
        unregistered(self, template=meta_template(self.family.model_class, config), views={})
        self.model = self.base_model_class_for_family(config)
        self.lm_head = tenant_copies(self.template.lm_head, config)
        self.take_family_settings()
        self.post_init()
        self.build_views()

    def head(self, name: str) -> nn.Module:
        """Tenant `name`'s lm_head as the family applies it (scaled input when it ties)."""
        scale = self.family.head_scale(self.config) if self.config.tenants[name].get("tie_word_embeddings") else None
        return self.lm_head[name] if scale is None else ScaledHead(self.lm_head[name], scale)

    def view(self, tenant: str | None) -> nn.Module:
        """The family's model with its head running tenant `tenant`'s modules (`None`: a mixed batch's)."""
        if tenant not in self.views:
            if tenant is None:
                head = RowDispatch({name: self.head(name) for name in self.tenants})
            else:
                head = self.head(tenant)
            self.views[tenant] = view_of(self.template, **self.model.view_children(tenant), lm_head=head)
        return train_as(self.views[tenant], self.training)

    def get_encoder(self, modality: str | None = None) -> TenantEncoder:
        return self.model.get_encoder(modality)

    def set_input_embeddings(self, value: nn.Module) -> None:
        """The current tenant's input embedding, as the family sets it: `shared` and both stacks'
        embeddings become `value`; the views are rebuilt to read it."""
        tenant = self.model.resolve_tenant(None)
        for owner in (self.model.tenant_embeddings, *(stack.embed_tokens for stack in self.model.stacks)):
            owner[tenant] = value
        self.build_views()

    def add_tenant_modules(self, name: str) -> None:
        """Register new, uninitialised modules for tenant `name` (already in the config)."""
        self.model.add_tenant_modules(name)
        add_tenant_copies(self, ["lm_head"], name)

    def tenant_modules(self, name: str) -> dict[str, nn.Module]:
        """Every module that belongs to tenant `name` alone, keyed by qualified name."""
        name = self.model.known_tenant(name)
        return self.model.tenant_modules(name) | {f"lm_head.{name}": self.lm_head[name]}

    def _resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        raise NotImplementedError(
            "resize_token_embeddings is not supported on multi-tenant encoder-decoder models yet: each tenant's "
            "shared, encoder and decoder embeddings would have to be resized together."
        )

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, tenant=None, tenant_names=None, tenant_ids=None, **kwargs):
        r"""
        The family's own forward (the same arguments and outputs), plus `tenant`, `tenant_names`
        and `tenant_ids` as in `MultiTenantForCausalLM.forward`.
        """
        rows = call_rows(input_ids, kwargs)
        routing: TenantRouting = self.model.route(rows.shape[0], tenant, tenant_names, tenant_ids, rows.device)
        return self.model.run(self.view(routing.tenant), routing, input_ids=input_ids, **kwargs)


__all__ = ["MultiTenantForConditionalGeneration", "MultiTenantSeq2SeqModel", "MultiTenantStack", "TenantEncoder"]
