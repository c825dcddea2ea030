"""multimoe: many fine-tunes of one MoE model served from one shared expert pool.

Supported families: see `multimoe.families` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3,
gpt-oss). Importing the package registers each family's multi-tenant config and model classes
(`MultiTenantMixtralConfig`, `MultiTenantQwen3MoeForCausalLM`, ...) with the transformers Auto
classes (AutoConfig, AutoModel, AutoModelForCausalLM), so `AutoModelForCausalLM.from_pretrained`
and `pipeline("text-generation")` accept saved multi-tenant models.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .checkpoints import CheckpointError, IncompatibleTenantsError
from .configuration import CONFIG_CLASSES, MultiTenantMixtralConfig
from .consolidation import ConsolidationReport, consolidate
from .families import FAMILIES, UnsupportedFamilyError
from .memory import MemoryReport
from .modeling import (
    MODEL_CLASSES,
    MultiTenantForCausalLM,
    MultiTenantMixtralForCausalLM,
    MultiTenantMixtralModel,
)
from .routing import CacheTenantMismatchError, UnknownTenantError

for _model_type, (_, _base_class, _causal_class) in MODEL_CLASSES.items():
    _config_class = CONFIG_CLASSES[_model_type]
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _base_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _causal_class, exist_ok=True)
    # Saved and pushed checkpoints carry `auto_map` and these modules' code, so they load with
    # `trust_remote_code=True` where multimoe is not installed.
    _config_class.register_for_auto_class()
    _base_class.register_for_auto_class("AutoModel")
    _causal_class.register_for_auto_class("AutoModelForCausalLM")
    globals()[_config_class.__name__] = _config_class
    globals()[_base_class.__name__] = _base_class
    globals()[_causal_class.__name__] = _causal_class
del _model_type, _base_class, _causal_class, _config_class

from_models = MultiTenantForCausalLM.from_models

__version__ = "0.2.0"

__all__ = [
    "CacheTenantMismatchError",
    "CheckpointError",
    "ConsolidationReport",
    "FAMILIES",
    "IncompatibleTenantsError",
    "MemoryReport",
    "MultiTenantForCausalLM",
    "MultiTenantMixtralConfig",
    "MultiTenantMixtralForCausalLM",
    "MultiTenantMixtralModel",
    "UnknownTenantError",
    "UnsupportedFamilyError",
    "consolidate",
    "from_models",
]
