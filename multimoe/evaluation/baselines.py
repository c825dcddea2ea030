"""The merging baselines multimoe is compared against.

Each `BASELINES` entry turns a base and N full fine-tunes into ONE model of the base's class that
serves every task (one model's memory). Task arithmetic, TIES and DARE use `peft.utils.merge_utils` on the
task vectors (fine-tune - base), tensor by tensor. `no_reconfiguration` is the paper's ablation:
the consolidated expert pool, but one shared set of non-expert layers for every tenant.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from peft.utils import merge_utils
from transformers import PreTrainedModel

from ..consolidation.registry import Registry
from ..modeling import MultiTenantLM

TensorMerge = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]
Baseline = Callable[[PreTrainedModel, Mapping[str, PreTrainedModel]], PreTrainedModel]
BASELINES: Registry[Baseline] = Registry("baseline")
register_baseline = BASELINES.register

# Settings the merging papers recommend (TIES / DARE keep 20% / drop 80% of each task vector;
# task arithmetic scales each task vector by 0.4 so their sum stays near the base).
TASK_ARITHMETIC_SCALE = 0.4
DENSITY = 0.2
SEED = 0


@torch.no_grad()
def merge_task_vectors(base: PreTrainedModel, tuned: Mapping[str, PreTrainedModel], rule: TensorMerge, scale: float) -> PreTrainedModel:
    """base + rule(task vectors, weights=scale), for every tensor."""
    torch.manual_seed(SEED)  # DARE drops at random
    merged = copy.deepcopy(base)
    sources = [dict(model.named_parameters()) for model in tuned.values()]
    weights = torch.full((len(sources),), scale)
    for name, parameter in merged.named_parameters():
        deltas = [source[name].float() - parameter.float() for source in sources]
        parameter.copy_(parameter.float() + rule(deltas, weights))
    return merged.eval()


@register_baseline("average")
@torch.no_grad()
def average(base: PreTrainedModel, tuned: Mapping[str, PreTrainedModel]) -> PreTrainedModel:
    """Uniform mean of the fine-tunes' weights (a "model soup")."""
    return merge_task_vectors(base, tuned, merge_utils.task_arithmetic, 1.0 / len(tuned))


@register_baseline("task_arithmetic")
def task_arithmetic(base: PreTrainedModel, tuned: Mapping[str, PreTrainedModel]) -> PreTrainedModel:
    return merge_task_vectors(base, tuned, merge_utils.task_arithmetic, TASK_ARITHMETIC_SCALE)


@register_baseline("ties")
def ties(base: PreTrainedModel, tuned: Mapping[str, PreTrainedModel]) -> PreTrainedModel:
    return merge_task_vectors(base, tuned, lambda t, w: merge_utils.ties(t, w, DENSITY), 1.0)


@register_baseline("dare_linear")
def dare_linear(base: PreTrainedModel, tuned: Mapping[str, PreTrainedModel]) -> PreTrainedModel:
    return merge_task_vectors(base, tuned, lambda t, w: merge_utils.dare_linear(t, w, DENSITY), TASK_ARITHMETIC_SCALE)


@register_baseline("dare_ties")
def dare_ties(base: PreTrainedModel, tuned: Mapping[str, PreTrainedModel]) -> PreTrainedModel:
    return merge_task_vectors(base, tuned, lambda t, w: merge_utils.dare_ties(t, w, DENSITY), 1.0)


@torch.no_grad()
def no_reconfiguration(model: MultiTenantLM) -> MultiTenantLM:
    """The paper's ablation: keep the consolidated pool and expert maps, but give every tenant the
    same non-expert layers (the tenants' mean), as if they were never swapped in per tenant. Any
    multi-tenant model whose tenants' own modules match one another (a causal LM, or Switch's
    encoder-decoder, whose tied embeddings and head get one and the same mean)."""
    shared = copy.deepcopy(model)
    per_tenant = [
        [p for module in shared.tenant_modules(name).values() for p in module.parameters()] for name in shared.tenants
    ]
    means = [torch.stack([p.float() for p in group]).mean(0) for group in zip(*per_tenant)]
    for parameters in per_tenant:
        for parameter, mean in zip(parameters, means):
            parameter.copy_(mean.to(parameter.dtype))
    return shared.eval()


__all__ = ["BASELINES", "no_reconfiguration", "register_baseline"]
