"""Task quality of any causal LM or multi-tenant model: exact match and held-out perplexity,
plus the model-merging baselines multimoe is compared against."""

from .harness import exact_match, perplexity, score_tenants
from .baselines import BASELINES, no_reconfiguration, register_baseline

__all__ = ["BASELINES", "exact_match", "no_reconfiguration", "perplexity", "register_baseline", "score_tenants"]
