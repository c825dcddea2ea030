"""Task quality of any causal LM or multi-tenant model: exact match and held-out perplexity, ROUGE
for encoder-decoder models with free-text answers, plus the model-merging baselines multimoe is
compared against."""

from .harness import exact_match, perplexity, score_tenants
from .rouge import rouge_scores
from .baselines import BASELINES, no_reconfiguration, register_baseline

__all__ = ["BASELINES", "exact_match", "no_reconfiguration", "perplexity", "register_baseline", "rouge_scores", "score_tenants"]
