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
import re
import sys
from dataclasses import dataclass
from functools import cached_property

import torch
import transformers
from torch import nn
from transformers import PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

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
class Family:
    """The declarative adapter of one MoE family (see the module docstring)."""

    model_type: str
    sparse_block: str = "mlp"
    experts: str = "experts"
    legacy: LegacyExperts | None = None
    # (regex of a name in checkpoints of an earlier release, the module name today), applied on load.
    saved_renames: tuple[tuple[str, str], ...] = ()

    # -- the family's own classes --------------------------------------------------------------

    @cached_property
    def causal_lm_class(self) -> type:
        return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[self.model_type])

    @cached_property
    def base_model_class(self) -> type:
        return getattr(transformers, MODEL_MAPPING_NAMES[self.model_type])

    @cached_property
    def config_class(self) -> type[PreTrainedConfig]:
        return self.causal_lm_class.config_class

    @cached_property
    def decoder_layer_class(self) -> type[nn.Module]:
        module = sys.modules[self.base_model_class.__module__]
        return getattr(module, self.base_model_class._no_split_modules[0])

    @property
    def class_stem(self) -> str:
        """`Qwen3Moe` for `Qwen3MoeForCausalLM`: the multi-tenant classes are named after it."""
        return self.causal_lm_class.__name__.removesuffix("ForCausalLM")

    @property
    def multitenant_model_type(self) -> str:
        return f"multitenant_{self.model_type}"

    # -- reading a config --------------------------------------------------------------------

    def sparse_block_of(self, decoder_layer: nn.Module) -> nn.Module | None:
        """The layer's sparse block, or None for a dense layer (its MLP holds no fused experts)."""
        block = getattr(decoder_layer, self.sparse_block, None)
        experts = getattr(block, self.experts, None) if block is not None else None
        return block if experts is not None and hasattr(type(experts), "_apply_gate") else None

    def sparse_layers(self, config: PreTrainedConfig) -> list[bool]:
        """Which decoder layers are sparse, read off the family's own layers built on the meta device."""
        with torch.device("meta"):
            return [
                self.sparse_block_of(self.decoder_layer_class(config, layer_idx)) is not None
                for layer_idx in range(config.num_hidden_layers)
            ]

    def pool(self, config: PreTrainedConfig, num_experts: int) -> nn.Module:
        """The family's experts class holding `num_experts` experts, computing with `config` (so that
        `set_experts_implementation` on the model reaches it)."""
        sized = copy.copy(config)
        for field in EXPERT_COUNT_FIELDS:
            if hasattr(sized, field):
                setattr(sized, field, num_experts)
        pool = type(self.experts_template(config))(sized)
        pool.config = config
        return pool

    def experts_template(self, config: PreTrainedConfig) -> nn.Module:
        """The experts module of the family's first sparse layer, built on the meta device (layers are
        built one at a time until one is sparse: a full DeepSeek-V3 config holds 61)."""
        with torch.device("meta"):
            for layer_idx in range(config.num_hidden_layers):
                block = self.sparse_block_of(self.decoder_layer_class(config, layer_idx))
                if block is not None:
                    return getattr(block, self.experts)
        raise UnsupportedFamilyError(f"{self.model_type}: this config has no sparse layer.")

    def expert_parameter_names(self, config: PreTrainedConfig) -> tuple[str, ...]:
        """The experts' tensors in the family's fused layout, each stacked over experts on dim 0."""
        return tuple(name for name, _ in self.experts_template(config).named_parameters())

    def expert_outputs(self, config: PreTrainedConfig, experts: tuple[torch.Tensor, ...], inputs: torch.Tensor):
        """Every expert's output on every input row, [E, N, H], computed by the family's own experts
        class (its eager path): consolidation's output metrics and merge rules go through this, so
        they hold for any layout (gpt-oss's transposed, interleaved experts with biases included).
        `experts` are the layer's stacked expert tensors in `expert_parameter_names` order."""
        count, rows = experts[0].shape[0], inputs.shape[0]
        eager = copy.copy(config)
        eager._experts_implementation = "eager"
        with torch.device("meta"):
            module = self.pool(eager, count)
        hidden = inputs.to(experts[0].dtype).repeat(count, 1)
        index = torch.arange(count, device=inputs.device).repeat_interleave(rows)[:, None]
        weights = torch.ones(count * rows, 1, dtype=hidden.dtype, device=inputs.device)
        parameters = dict(zip((name for name, _ in module.named_parameters()), experts))
        output = torch.func.functional_call(module, parameters, (hidden, index, weights))
        return output.view(count, rows, -1)

    def expert_key(self, layer_idx: int, parameter: str) -> str:
        return f"model.layers.{layer_idx}.{self.sparse_block}.{self.experts}.{parameter}"

    @cached_property
    def expert_key_pattern(self) -> re.Pattern:
        return re.compile(rf"model\.layers\.\d+\.{re.escape(self.sparse_block)}\.{re.escape(self.experts)}\.")

    def is_expert_key(self, name: str) -> bool:
        return self.expert_key_pattern.match(name) is not None

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
    raise UnsupportedFamilyError(f"{owner} has model_type {model_type!r}, which is not a causal LM transformers knows.")


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

__all__ = ["FAMILIES", "Family", "LegacyExperts", "UnsupportedFamilyError", "family_for", "register"]
