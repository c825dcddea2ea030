"""multimoe: many fine-tunes of one Mixtral served from one shared expert pool.

Importing the package registers `MultiTenantMixtralConfig`, `MultiTenantMixtralModel` and
`MultiTenantMixtralForCausalLM` with the transformers Auto classes (AutoConfig, AutoModel,
AutoModelForCausalLM), so `AutoModelForCausalLM.from_pretrained` and
`pipeline("text-generation")` accept saved multi-tenant models.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .checkpoints import CheckpointError, IncompatibleTenantsError
from .configuration import MultiTenantMixtralConfig
from .consolidation import ConsolidationReport, consolidate
from .memory import MemoryReport
from .modeling import MultiTenantMixtralForCausalLM, MultiTenantMixtralModel
from .routing import CacheTenantMismatchError, UnknownTenantError

AutoConfig.register(MultiTenantMixtralConfig.model_type, MultiTenantMixtralConfig, exist_ok=True)
AutoModel.register(MultiTenantMixtralConfig, MultiTenantMixtralModel, exist_ok=True)
AutoModelForCausalLM.register(MultiTenantMixtralConfig, MultiTenantMixtralForCausalLM, exist_ok=True)
# Saved and pushed checkpoints carry `auto_map` and these modules' code, so they load with
# `trust_remote_code=True` where multimoe is not installed.
MultiTenantMixtralConfig.register_for_auto_class()
MultiTenantMixtralModel.register_for_auto_class("AutoModel")
MultiTenantMixtralForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

__all__ = [
    "CacheTenantMismatchError",
    "CheckpointError",
    "ConsolidationReport",
    "IncompatibleTenantsError",
    "MemoryReport",
    "MultiTenantMixtralConfig",
    "MultiTenantMixtralForCausalLM",
    "MultiTenantMixtralModel",
    "UnknownTenantError",
    "consolidate",
]
