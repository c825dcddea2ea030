"""multimoe: many fine-tunes of one MoE model served from one shared expert pool.

Supported families: see `multimoe.families` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3,
gpt-oss). Importing the package registers each family's multi-tenant config and model classes
(`MultiTenantMixtralConfig`, `MultiTenantQwen3MoeForCausalLM`, ...) with the transformers Auto
classes (AutoConfig, AutoModel, AutoModelForCausalLM), so `AutoModelForCausalLM.from_pretrained`
and `pipeline("text-generation")` accept saved multi-tenant models.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from .checkpoints import CheckpointError, IncompatibleTenantsError
from .configuration import MultiTenantMixtralConfig, config_class_for
from .consolidation import ConsolidationReport, RecoveryReport, consolidate, recover
from .families import FAMILIES, Family, LegacyExperts, UnsupportedFamilyError, register
from .memory import MemoryReport
from .modeling import MultiTenantForCausalLM, MultiTenantLM, MultiTenantMixtralForCausalLM, MultiTenantMixtralModel, classes_for
from .routing import CacheTenantMismatchError, UnknownTenantError


def register_family(family: Family) -> type[MultiTenantLM]:
    """Serve fine-tunes of `family`: register its adapter, make its multi-tenant config and model
    classes, and register them with the transformers Auto classes (AutoModelForSeq2SeqLM for an
    encoder-decoder family). Returns its model class with the head.

    Saved checkpoints carry `auto_map` and multimoe's code, so they load with
    `trust_remote_code=True` where multimoe is not installed (for the families registered when
    that code is imported: the built-in ones)."""
    register(family)
    config_class = config_class_for(family)
    _, base_class, causal_class = classes_for(family)
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, base_class, exist_ok=True)
    head_auto = AutoModelForSeq2SeqLM if family.is_encoder_decoder else AutoModelForCausalLM
    head_auto.register(config_class, causal_class, exist_ok=True)
    config_class.register_for_auto_class()
    base_class.register_for_auto_class("AutoModel")
    causal_class.register_for_auto_class(head_auto.__name__)
    for public in (config_class, base_class, causal_class):
        globals()[public.__name__] = public
    return causal_class


for _family in list(FAMILIES.values()):
    register_family(_family)
del _family

from_models = MultiTenantForCausalLM.from_models

__version__ = "0.2.0"

__all__ = [
    "CacheTenantMismatchError",
    "CheckpointError",
    "ConsolidationReport",
    "RecoveryReport",
    "FAMILIES",
    "Family",
    "LegacyExperts",
    "IncompatibleTenantsError",
    "MemoryReport",
    "MultiTenantForCausalLM",
    "MultiTenantLM",
    "MultiTenantMixtralConfig",
    "MultiTenantMixtralForCausalLM",
    "MultiTenantMixtralModel",
    "UnknownTenantError",
    "UnsupportedFamilyError",
    "consolidate",
    "recover",
    "from_models",
    "register_family",
]
