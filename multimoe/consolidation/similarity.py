"""Expert distance metrics, registered by name. Adding a metric is one decorated function here.

A metric compares every expert of tenant A with every expert of tenant B in one layer and returns
an [E_A, E_B] matrix of distances (0 = identical). Experts come as the layer's tensors in the
family's fused layout (`Family.expert_parameter_names`), each stacked over experts on dim 0.
`layer_inputs` are hidden states that reached this layer's experts on calibration data (rows
[n, H]); only output-based metrics need them, and they run the experts with `run_experts`, which
computes them as the family's own experts class does, whatever its layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedConfig

from ..assembly import ExpertTensors
from ..families import Family
from .registry import Registry

# (stacked experts, inputs [n, H]) -> every expert's output on every input, [E, n, H].
RunExperts = Callable[[ExpertTensors, torch.Tensor], torch.Tensor]
Metric = Callable[[ExpertTensors, ExpertTensors, "torch.Tensor | None", RunExperts], torch.Tensor]

SIMILARITY_METRICS: Registry[Metric] = Registry("similarity metric")
register_metric = SIMILARITY_METRICS.register
get_metric = SIMILARITY_METRICS.lookup
NEEDS_CALIBRATION = SIMILARITY_METRICS.needs_calibration
# Identical experts must be exactly 0 apart (threshold 0 means lossless); the matmul shortcut of
# cdist is not exact.
EXACT = "donot_use_mm_for_euclid_dist"


def expert_runner(family: Family, config: PreTrainedConfig) -> RunExperts:
    """The family's experts as a function, computing in float32: distances and merges of bf16
    experts are then not decided by bf16 rounding."""

    def run_experts(experts: ExpertTensors, inputs: torch.Tensor) -> torch.Tensor:
        return family.expert_outputs(config, tuple(tensor.float() for tensor in experts), inputs.float())

    return run_experts


def flat_weights(experts: ExpertTensors) -> torch.Tensor:
    """One row per expert: all of its tensors (biases included) flattened and concatenated."""
    return torch.cat([tensor.flatten(1) for tensor in experts], dim=1).float()


@register_metric("weight_l2")
def weight_l2(a: ExpertTensors, b: ExpertTensors, layer_inputs: torch.Tensor | None, run_experts: RunExperts) -> torch.Tensor:
    """The paper's metric: L2 distance between flattened weights."""
    return torch.cdist(flat_weights(a), flat_weights(b), compute_mode=EXACT)


@register_metric("weight_cosine")
def weight_cosine(a: ExpertTensors, b: ExpertTensors, layer_inputs: torch.Tensor | None, run_experts: RunExperts) -> torch.Tensor:
    """1 - cosine similarity of flattened weights: blind to scale, so comparable across layers."""
    return (1 - F.normalize(flat_weights(a), dim=1) @ F.normalize(flat_weights(b), dim=1).T).clamp(min=0)


@register_metric("output", needs_calibration=True)
def output_distance(a: ExpertTensors, b: ExpertTensors, layer_inputs: torch.Tensor | None, run_experts: RunExperts) -> torch.Tensor:
    """Relative distance between experts' outputs on the calibration hidden states of this layer:
    ||f_a(X) - f_b(X)|| / ||f_a(X)||, the signal MoE-merging work finds most robust."""
    if layer_inputs is None:
        raise ValueError("The 'output' metric needs calibration data.")
    outputs_a = run_experts(a, layer_inputs).flatten(1)
    outputs_b = run_experts(b, layer_inputs).flatten(1)
    scale = outputs_a.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.cdist(outputs_a, outputs_b, compute_mode=EXACT) / scale


__all__ = ["NEEDS_CALIBRATION", "SIMILARITY_METRICS", "RunExperts", "expert_runner", "get_metric", "register_metric"]
