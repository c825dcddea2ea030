"""What multimoe must know about an MoE family, declared once per family.

A family's own transformers classes do all the computing: a tenant's decoder layers are the
family's decoder layers, and each layer's shared pool is the family's experts class sized to the
pool. What differs between families, and is declared here, is only:

- where the sparse block sits in a decoder layer (`mlp`, `feed_forward`, `block_sparse_moe`, ...)
  and which of its children holds the fused experts;
- the per-expert names of the legacy checkpoint layout, where the family has one (the names
  transformers' own conversion mapping reads);
- renames between an earlier multimoe release's saved names and today's module names.

Everything else is read off the family's classes: the expert tensors (`gate_up_proj`,
`down_proj`, and biases where the family has them, each stacked over experts on dim 0), which
layers are dense, and how the router's output becomes local expert indices (the family's own
sparse block does that and calls its experts with them). Adding a family is one `register` call;
see docs/families.md.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
import transformers
from torch import nn
from transformers import PreTrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

# The config fields families use for the number of routed experts; a pool sets every one present.
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# The children of a family's base model that multimoe knows how to hold: per tenant (the first
# three, which it needs) or once (the rotary embedding, where the family has one).
BASE_MODEL_CHILDREN = ("embed_tokens", "layers", "norm", "rotary_emb")


def routed_experts(config: PreTrainedConfig) -> int:
    """E, the number of routed experts per sparse layer, under whichever field the family names it."""
    return next(getattr(config, field) for field in EXPERT_COUNT_FIELDS if getattr(config, field, None))


class UnsupportedFamilyError(ValueError):
    """A model family that multimoe cannot serve as tenants (no fused experts, or a layout it cannot hold)."""


@dataclass(frozen=True)
class LegacyExperts:
    """A family's legacy per-expert checkpoint names: `model.layers.L.<block>.experts.E.<gate>.weight`
    (and `<up>`, `<down>`), stacked on load into the fused `gate_up_proj` ([gate; up] on dim 1)
    and `down_proj`, as transformers' conversion mapping does."""

    block: str
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class ExpertProgram:
    """How one expert of a fused pool computes, on its declared layout: `first` (with `first_bias`),
    then `between` (the family's gate or activation), then `second` (with `second_bias`); each
    matrix stored [out, in], or [in, out] when `transposed`. What low-rank deltas correct
    (`multimoe.expert_deltas`)."""

    first: str
    second: str
    first_bias: str | None = None
    second_bias: str | None = None
    transposed: bool = False

    def tensor(self, pool: nn.Module, name: str, entry: int) -> torch.Tensor:
        return getattr(pool, name)[entry]

    def product(self, pool: nn.Module, name: str, entry: int, rows: torch.Tensor) -> torch.Tensor:
        weight = self.tensor(pool, name, entry)
        return rows @ weight if self.transposed else rows @ weight.T

    def between(self, pool: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return pool._apply_gate(hidden) if pool.has_gate else pool.act_fn(hidden)


class PerExpertProgram(ExpertProgram):
    """An `ExpertProgram` over a container of one module per expert (Switch's `expert_<e>`, each
    `wi`, activation, dropout, `wo`)."""

    def tensor(self, pool: nn.Module, name: str, entry: int) -> torch.Tensor:
        return list(pool.children())[entry].get_parameter(name)

    def between(self, pool: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        expert = next(iter(pool.children()))  # every entry has the same activation and dropout
        hidden = expert.dropout(expert.act(hidden))
        return hidden.to(self.tensor(pool, self.second, 0).dtype)


@dataclass(frozen=True)
class Family:
    """The declarative adapter of one MoE family (see the module docstring)."""

    model_type: str
    sparse_block: str = "mlp"
    experts: str = "experts"
    legacy: LegacyExperts | None = None
    # (regex of a name in checkpoints of an earlier release, the module name today), applied on load.
    saved_renames: tuple[tuple[str, str], ...] = ()

    # -- the family's own classes --------------------------------------------------------------

    is_encoder_decoder = False

    @cached_property
    def model_class(self) -> type:
        """The family's model with its head: what a tenant is, and what multimoe reproduces."""
        return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[self.model_type])

    @property
    def causal_lm_class(self) -> type:
        """The causal families' name for `model_class`."""
        return self.model_class

    @cached_property
    def base_model_class(self) -> type:
        return getattr(transformers, MODEL_MAPPING_NAMES[self.model_type])

    @cached_property
    def config_class(self) -> type[PreTrainedConfig]:
        return self.model_class.config_class

    @cached_property
    def decoder_layer_class(self) -> type[nn.Module]:
        module = sys.modules[self.base_model_class.__module__]
        return getattr(module, self.base_model_class._no_split_modules[0])

    @property
    def output_recorders(self) -> dict:
        """What the family's code records for `output_hidden_states`, `output_router_logits`, ...:
        the `_can_record_outputs` of the class whose forward collects them."""
        return dict(getattr(self.base_model_class.__bases__[0], "_can_record_outputs", None) or {})

    @property
    def class_stem(self) -> str:
        """`Qwen3Moe` for `Qwen3MoeForCausalLM`: the multi-tenant classes are named after it."""
        return self.model_class.__name__.removesuffix("ForCausalLM")

    @property
    def multitenant_model_type(self) -> str:
        return f"multitenant_{self.model_type}"

    # -- the layers and where their experts sit -------------------------------------------

    def layer_paths(self, config: PreTrainedConfig) -> list[str]:
        """Where each layer sits in the family's model, in multimoe's layer order (the index of a
        tenant's `expert_map` row and of `pool_sizes`)."""
        return [f"model.layers.{layer_idx}" for layer_idx in range(config.num_hidden_layers)]

    def layer_templates(self, config: PreTrainedConfig) -> Iterator[nn.Module]:
        """The family's layers for `config`, built one at a time on the meta device (a full
        DeepSeek-V3 config holds 61)."""
        with torch.device("meta"):
            for layer_idx in range(config.num_hidden_layers):
                yield self.decoder_layer_class(config, layer_idx)

    def experts_path(self, layer: nn.Module) -> str | None:
        """Where a layer keeps its experts, or None for a dense layer (no fused experts)."""
        block = getattr(layer, self.sparse_block, None)
        experts = getattr(block, self.experts, None) if block is not None else None
        if experts is None or not hasattr(type(experts), "_apply_gate"):
            return None
        return f"{self.sparse_block}.{self.experts}"

    def sparse_block_of(self, layer: nn.Module) -> nn.Module | None:
        """The layer's sparse block (the module that calls its experts), or None for a dense layer."""
        path = self.experts_path(layer)
        return None if path is None else layer.get_submodule(path.rpartition(".")[0])

    def sparse_layers(self, config: PreTrainedConfig) -> list[bool]:
        """Which layers are sparse, read off the family's own layers."""
        return [self.experts_path(layer) is not None for layer in self.layer_templates(config)]

    def experts_template(self, config: PreTrainedConfig) -> nn.Module:
        """The experts module of the family's first sparse layer, on the meta device."""
        for layer in self.layer_templates(config):
            path = self.experts_path(layer)
            if path is not None:
                return layer.get_submodule(path)
        raise UnsupportedFamilyError(f"{self.model_type}: this config has no sparse layer.")

    def pool(self, config: PreTrainedConfig, num_experts: int) -> nn.Module:
        """The family's experts class holding `num_experts` experts, computing with `config` (so that
        `set_experts_implementation` on the model reaches it)."""
        pool = type(self.experts_template(config))(self.sized(config, num_experts))
        pool.config = config
        return pool

    @staticmethod
    def sized(config: PreTrainedConfig, num_experts: int) -> PreTrainedConfig:
        """A copy of `config` with `num_experts` routed experts, whatever the family calls the field."""
        sized = copy.copy(config)
        for field in EXPERT_COUNT_FIELDS:
            if hasattr(sized, field):
                setattr(sized, field, num_experts)
        return sized

    # -- experts as stacked tensors --------------------------------------------------------
    # multimoe reads, compares, merges and writes a layer's experts as one tensor per expert
    # parameter, stacked over experts on dim 0: the fused layout's own tensors.

    def expert_parameter_names(self, config: PreTrainedConfig) -> tuple[str, ...]:
        """The experts' tensors, each stacked over experts on dim 0."""
        return tuple(name for name, _ in self.experts_template(config).named_parameters())

    def experts_state(self, config: PreTrainedConfig, stacked: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """The state of an experts module holding `stacked` (names relative to the module)."""
        return dict(zip(self.expert_parameter_names(config), stacked))

    def stacked_experts(self, config: PreTrainedConfig, experts: nn.Module) -> tuple[torch.Tensor, ...]:
        """An experts module's tensors, stacked (the inverse of `experts_state`)."""
        return tuple(experts.get_parameter(name) for name in self.expert_parameter_names(config))

    per_expert_modules = False  # the experts are fused tensors, read as they are stored

    def stacked_name(self, config: PreTrainedConfig, key: str) -> str:
        """The name a stored key is read under (see `Seq2SeqFamily`; a fused family's are its own)."""
        return key

    def pool_routing(self, local: torch.Tensor, maps: torch.Tensor, pool_size: int) -> torch.Tensor:
        """The routing a sparse block passes its experts (here local expert indices, [tokens, k]),
        turned into the same routing over pool entries. `maps` is one tenant's local -> pool map [E],
        or one map per token [tokens, E]."""
        if maps.dim() == 1:
            return torch.take(maps, local)
        return torch.gather(maps, 1, local.reshape(maps.shape[0], -1)).view_as(local)

    def local_experts(self, routing: torch.Tensor) -> torch.Tensor:
        """The local expert indices of each token in the routing a block passes its experts
        (flattened; a token no expert takes adds none): what calibration counts."""
        return routing.flatten()

    def experts_call(self, index: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing arguments an experts module takes for expert `index[t]` per token, with `weights`."""
        return index, weights

    def routing_slots(self, routing: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each pick of the routing a block passes its experts, as (token, expert, weight) per pick."""
        tokens, picks = routing.shape
        token = torch.arange(tokens, device=routing.device).repeat_interleave(picks)
        return token, routing.reshape(-1), weights.reshape(-1)

    def expert_program(self, pool: nn.Module) -> ExpertProgram:
        """How the pool's experts compute (see `ExpertProgram`), read off the flags transformers'
        `use_experts_implementation` gives the family's experts class."""
        if getattr(pool, "has_post_expert_norm", False):
            raise UnsupportedFamilyError(
                f"{self.model_type}: low-rank deltas do not support experts with a post-expert norm."
            )
        first = "gate_up_proj" if pool.has_gate else "up_proj"
        biases = pool.has_bias
        return ExpertProgram(
            first,
            "down_proj",
            f"{first}_bias" if biases else None,
            "down_proj_bias" if biases else None,
            pool.is_transposed,
        )

    def expert_shapes(self, pool: nn.Module) -> dict[str, torch.Size]:
        """One expert's tensors' shapes, by name (`expert_parameter_names`), read off a pool."""
        return {name: tensor.shape[1:] for name, tensor in pool.named_parameters()}

    def expert_outputs(self, config: PreTrainedConfig, experts: tuple[torch.Tensor, ...], inputs: torch.Tensor):
        """Every expert's output on every input row, [E, N, H], computed by the family's own experts
        class (its eager path): consolidation's output metrics and merge rules go through this, so
        they hold for any layout (gpt-oss's transposed, interleaved experts with biases included).
        `experts` are the layer's stacked expert tensors in `expert_parameter_names` order."""
        count, rows = experts[0].shape[0], inputs.shape[0]
        eager = copy.copy(config)
        eager._experts_implementation = "eager"
        with torch.device("meta"):
            module = self.pool(eager, count).eval()  # an expert's dropout (Switch's) must not fire here
        hidden = inputs.to(experts[0].dtype).repeat(count, 1)
        index = torch.arange(count, device=inputs.device).repeat_interleave(rows)[:, None]
        weights = torch.ones(count * rows, 1, dtype=hidden.dtype, device=inputs.device)
        parameters = self.experts_state(config, experts)
        output = torch.func.functional_call(module, parameters, (hidden, *self.experts_call(index, weights)))
        return output.view(count, rows, -1)

    # -- checkpoint names ------------------------------------------------------------------

    def experts_modules(self, config: PreTrainedConfig) -> list[str | None]:
        """Per layer, where its experts module sits in the family's model (`None` for a dense layer)."""
        return [
            None if path is None else f"{layer}.{path}"
            for layer, path in zip(self.layer_paths(config), map(self.experts_path, self.layer_templates(config)))
        ]

    def expert_keys(self, config: PreTrainedConfig) -> list[tuple[str, ...] | None]:
        """Per layer, the names under which multimoe reads its stacked expert parameters from a
        source (`None` for a dense layer)."""
        parameters = self.expert_parameter_names(config)
        return [
            None if module is None else tuple(f"{module}.{name}" for name in parameters)
            for module in self.experts_modules(config)
        ]

    @cached_property
    def expert_key_pattern(self) -> re.Pattern:
        return re.compile(rf"model\.layers\.\d+\.{re.escape(self.sparse_block)}\.{re.escape(self.experts)}\.")

    def is_expert_key(self, name: str) -> bool:
        return self.expert_key_pattern.match(name) is not None

    def multitenant_key(self, key: str) -> str:
        """Where a source's parameter (or layer) `key` lives in the multi-tenant model, before the
        tenant is inserted: the causal families keep their names."""
        return key

    def tenant_key(self, key: str, tenant: str, layer_paths: list[str]) -> str:
        """Where a non-expert parameter of `tenant` (the family's name `key`) lives in the
        multi-tenant model: inside its layer's `tenants.<tenant>`, or in the `<tenant>` entry of a
        per-tenant module. `layer_paths` are `self.layer_paths(config)`."""
        for layer in layer_paths:
            if key.startswith(f"{layer}."):
                return self.multitenant_key(f"{layer}.tenants.{tenant}.{key.removeprefix(layer + '.')}")
        module, parameter = self.multitenant_key(key).rsplit(".", 1)
        return f"{module}.{tenant}.{parameter}"

    def multitenant_plan(self, plan: Mapping[str, str] | None, tenants: Iterable[str]) -> dict[str, str]:
        """One of the family's parallel plans (rules named as in its model: `layers.*.self_attn.q_proj`,
        `lm_head`) for the multi-tenant layout: a rule on the experts addresses the layer's pool
        (`layers.*.experts`); any other rule, each tenant's own copy (`layers.*.tenants.<t>.self_attn.q_proj`,
        `lm_head.<t>`). transformers matches rules by name with layer numbers as `*`, so the rules
        name every tenant (a name of digits only reads as a layer number: `*` names it)."""
        tenants = ["*" if tenant.isdigit() else tenant for tenant in tenants]
        experts, rules = f"layers.*.{self.sparse_block}.{self.experts}", {}
        for key, style in (plan or {}).items():
            if key == experts or key.startswith(f"{experts}."):
                rules[f"layers.*.experts{key.removeprefix(experts)}"] = style
            elif key == "layers.*":  # the layer itself: the multi-tenant layer, pool and tenants together
                rules[key] = style
            elif key.startswith("layers.*."):
                rules |= {f"layers.*.tenants.{tenant}.{key.removeprefix('layers.*.')}": style for tenant in tenants}
            else:
                module, _, rest = key.partition(".")
                rules |= {".".join(filter(None, (module, tenant, rest))): style for tenant in tenants}
        return rules

    @property
    def embedding_key(self) -> str:
        """The input embedding a tied lm_head reads."""
        return self.model_class._tied_weights_keys.get("lm_head.weight", "model.embed_tokens.weight")

    def head_scale(self, config: PreTrainedConfig) -> float | None:
        """What a tied tenant's hidden states are multiplied by before its lm_head, if anything."""
        return None

    def check(self, config: PreTrainedConfig) -> None:
        """Refuse, before any weight is read, a family (with the sources' `config`) whose base model
        multimoe cannot hold: children it has no place for, or missing, weights of the base model's
        own, decoder layers of several classes, or no sparse layer."""
        with torch.device("meta"):
            model = self.base_model_class(config)
        children = dict(model.named_children())
        problems = []
        extra = sorted(set(children) - set(BASE_MODEL_CHILDREN))
        if extra:
            problems.append(f"its base model holds {extra}, which multimoe has no per-tenant place for")
        missing = [name for name in BASE_MODEL_CHILDREN[:3] if children.get(name) is None]
        if missing:
            problems.append(f"its base model has no {missing}")
        own = [name for name, _ in model.named_parameters(recurse=False)]
        if own:
            problems.append(f"its base model holds weights of its own ({own})")
        layer_classes = sorted({type(layer).__name__ for layer in children.get("layers") or []})
        if layer_classes and layer_classes != [self.decoder_layer_class.__name__]:
            problems.append(f"its decoder layers are {layer_classes}, not all {self.decoder_layer_class.__name__}")
        elif not any(self.sparse_block_of(layer) is not None for layer in children.get("layers") or []):
            problems.append(f"no layer has a fused-experts `{self.sparse_block}.{self.experts}`")
        if problems:
            raise UnsupportedFamilyError(f"{self.model_type} cannot be served as tenants: {'; '.join(problems)}.")


@dataclass(frozen=True)
class Seq2SeqFamily(Family):
    """An encoder-decoder MoE family whose experts are one module per expert, as in Switch
    Transformers (`experts.expert_<e>.wi`, `.wo`).

    Its layers are the encoder's blocks, then the decoder's, numbered on together. A sparse block is
    wherever a module holds an `experts` container (Switch: the last sub-layer's `mlp`). multimoe sees
    a layer's experts stacked (`experts.wi.weight` [E, d_ff, d_model]); the pool is the family's own
    container sized to the pool. The block passes its experts a one-hot dispatch mask [tokens, 1, E]
    (zero for a token dropped by expert capacity) and the router probability [tokens, 1]. A tied
    tenant's hidden states are scaled by `d_model ** -0.5` before its lm_head, as the family does.
    """

    stacks: tuple[str, ...] = ("encoder", "decoder")
    layer_list: str = "block"
    is_encoder_decoder = True
    per_expert_modules = True

    @cached_property
    def model_class(self) -> type:
        return getattr(transformers, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES[self.model_type])

    @property
    def class_stem(self) -> str:
        return self.model_class.__name__.removesuffix("ForConditionalGeneration")

    @property
    def output_recorders(self) -> dict:
        # Each stack collects its own (Switch: `SwitchTransformersStack._can_record_outputs`).
        with torch.device("meta"):
            stack = getattr(self.base_model_class(self.config_class()), self.stacks[0])
        return dict(type(stack)._can_record_outputs)

    def stack_sizes(self, config: PreTrainedConfig) -> dict[str, int]:
        sizes = (config.num_layers, config.num_decoder_layers)
        return dict(zip(self.stacks, sizes))

    def layer_paths(self, config: PreTrainedConfig) -> list[str]:
        return [
            f"{stack}.{self.layer_list}.{index}"
            for stack, size in self.stack_sizes(config).items()
            for index in range(size)
        ]

    def layer_templates(self, config: PreTrainedConfig) -> Iterator[nn.Module]:
        # The family's model builds its stacks whole, so the layers come from one meta model, kept
        # per config: reading experts layer by layer would otherwise rebuild it a thousand times.
        model = self.meta_model(config.to_json_string(use_diff=False))
        return (model.get_submodule(path) for path in self.layer_paths(config))

    @functools.lru_cache(maxsize=4)
    def meta_model(self, config_json: str) -> nn.Module:
        """The family's model on the meta device for a config (given as JSON: configs do not hash).
        Shared: callers read it, never change it."""
        with torch.device("meta"):
            return self.model_class(self.config_class(**json.loads(config_json)))

    def experts_path(self, layer: nn.Module) -> str | None:
        for name, module in layer.named_modules():
            if isinstance(getattr(module, self.experts, None), (nn.ModuleDict, nn.ModuleList)):
                return f"{name}.{self.experts}"
        return None

    def expert_parameter_names(self, config: PreTrainedConfig) -> tuple[str, ...]:
        experts = self.experts_template(config)
        return tuple(name for name, _ in next(iter(experts.children())).named_parameters())

    def entry_names(self, config: PreTrainedConfig, count: int) -> list[str]:
        """The names of an experts container's `count` entries (Switch: `expert_0`, ...)."""
        return self.entry_names_of(config.to_json_string(use_diff=False), count)

    @functools.lru_cache(maxsize=16)
    def entry_names_of(self, config_json: str, count: int) -> list[str]:
        config = self.config_class(**json.loads(config_json))
        with torch.device("meta"):
            return [name for name, _ in type(self.experts_template(config))(self.sized(config, count)).named_children()]

    @cached_property
    def stored_expert_pattern(self) -> re.Pattern:
        return re.compile(rf"(?P<experts>{self.expert_key_pattern.pattern[:-2]})\.(?P<entry>[^.]+)\.(?P<parameter>.+)")

    def stacked_name(self, config: PreTrainedConfig, key: str) -> str:
        """A stored per-expert key of an expert this config has (`...experts.expert_3.wi.weight`)
        stands for the layer's stacked tensor (`...experts.wi.weight`); any other key for itself, so
        that a stray tensor is refused by its own name."""
        match = self.stored_expert_pattern.fullmatch(key)
        if match and match["entry"] in self.entry_names(config, routed_experts(config)):
            return f"{match['experts']}.{match['parameter']}"
        return key

    def read_experts(self, config: PreTrainedConfig, layer_idx: int, read) -> tuple[torch.Tensor, ...]:
        """Layer `layer_idx`'s experts, stacked, from a source whose `read(key)` gives a stored tensor."""
        keys = self.expert_keys(config)[layer_idx]
        entries = self.entry_names(config, routed_experts(config))
        names = self.expert_parameter_names(config)
        return tuple(
            torch.stack([read(f"{key.removesuffix(name)}{entry}.{name}") for entry in entries])
            for key, name in zip(keys, names)
        )

    def experts_state(self, config: PreTrainedConfig, stacked: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        names = self.expert_parameter_names(config)
        entries = self.entry_names(config, stacked[0].shape[0])
        return {
            f"{entry}.{name}": tensor[index]
            for index, entry in enumerate(entries)
            for name, tensor in zip(names, stacked)
        }

    def stacked_experts(self, config: PreTrainedConfig, experts: nn.Module) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.stack([entry.get_parameter(name) for entry in experts.children()])
            for name in self.expert_parameter_names(config)
        )

    def pool_routing(self, local: torch.Tensor, maps: torch.Tensor, pool_size: int) -> torch.Tensor:
        # A one-hot mask over local experts becomes one over pool entries; a dropped token stays all zero.
        index = maps.view(-1, 1, local.shape[-1]).expand_as(local)
        return local.new_zeros(*local.shape[:-1], pool_size).scatter_add_(-1, index, local)

    def local_experts(self, routing: torch.Tensor) -> torch.Tensor:
        return routing.reshape(-1, routing.shape[-1]).nonzero()[:, 1]

    def experts_call(self, index: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = int(index.max()) + 1
        return nn.functional.one_hot(index, count), weights

    def routing_slots(self, routing: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        token, pick, expert = routing.nonzero().unbind(1)  # a token dropped by capacity has no pick
        return token, expert, weights[token, pick]

    def expert_program(self, pool: nn.Module) -> ExpertProgram:
        return PerExpertProgram("wi.weight", "wo.weight")

    def expert_shapes(self, pool: nn.Module) -> dict[str, torch.Size]:
        return {name: tensor.shape for name, tensor in next(iter(pool.children())).named_parameters()}

    @cached_property
    def expert_key_pattern(self) -> re.Pattern:
        stacks = "|".join(self.stacks)
        return re.compile(rf"(?:{stacks})\.{self.layer_list}\.\d+\.(?:[\w.]+\.)?{re.escape(self.experts)}\.")

    def multitenant_key(self, key: str) -> str:
        # The family's model holds the embedding, encoder and decoder at the top; the multi-tenant
        # model keeps them in its base model, under `model.`, as the causal families do.
        return key if key.startswith("lm_head.") else f"model.{key}"

    def head_scale(self, config: PreTrainedConfig) -> float | None:
        return config.d_model**-0.5

    def check(self, config: PreTrainedConfig) -> None:
        if not any(self.sparse_layers(config)):
            raise UnsupportedFamilyError(f"{self.model_type} cannot be served as tenants: no block has experts.")


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make `family` available to `from_models`, `consolidate` and loading (one call per family)."""
    FAMILIES[family.model_type] = family
    return family


def family_for(model_type: str | None, *, owner: str) -> Family:
    """The registered family of a source's `model_type`, or a clear refusal naming `owner`."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedFamilyError(
            f"{owner} is a {model_type!r} model, which is not a supported MoE family; supported: {sorted(FAMILIES)} "
            "(see docs/families.md)."
        )
    raise UnsupportedFamilyError(
        f"{owner} has model_type {model_type!r}, which is not a causal or seq2seq LM transformers knows."
    )


# Per-expert names of the legacy layout: Mixtral's own, and the one Qwen-style families share.
MIXTRAL_LEGACY = LegacyExperts(block="block_sparse_moe", gate="w1", up="w3", down="w2")
PROJECTION_LEGACY = LegacyExperts(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")

register(
    Family(
        "mixtral",
        legacy=MIXTRAL_LEGACY,
        # multimoe 0.1 saved each tenant's router as `router`; today it is the Mixtral block's `mlp.gate`.
        saved_renames=((r"(\.tenants\.[^.]+)\.router\.", r"\1.mlp.gate."),),
    )
)
register(Family("qwen2_moe", legacy=PROJECTION_LEGACY))
register(Family("qwen3_moe", legacy=PROJECTION_LEGACY))
register(Family("olmoe", legacy=PROJECTION_LEGACY))
register(Family("deepseek_v3", legacy=PROJECTION_LEGACY))
register(Family("gpt_oss"))
register(Seq2SeqFamily("switch_transformers"))

__all__ = [
    "FAMILIES", "ExpertProgram", "Family", "LegacyExperts", "Seq2SeqFamily", "UnsupportedFamilyError", "family_for",
    "register",
]
