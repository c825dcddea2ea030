"""Expert distance metrics, registered by name. Adding a metric is one decorated function here.

A metric compares every expert of tenant A with every expert of tenant B in one layer and returns
an [E_A, E_B] matrix of distances (0 = identical). `layer_inputs` are hidden states that reached
this layer's experts on calibration data (rows [n, H]); only output-based metrics need them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .registry import Registry

ExpertPair = tuple[torch.Tensor, torch.Tensor]  # gate_up [E, 2I, H], down [E, H, I]
Metric = Callable[[ExpertPair, ExpertPair, "torch.Tensor | None", str], torch.Tensor]

SIMILARITY_METRICS: Registry[Metric] = Registry("similarity metric")
register_metric = SIMILARITY_METRICS.register
get_metric = SIMILARITY_METRICS.lookup
NEEDS_CALIBRATION = SIMILARITY_METRICS.needs_calibration
# Identical experts must be exactly 0 apart (threshold 0 means lossless); the matmul shortcut of
# cdist is not exact.
EXACT = "donot_use_mm_for_euclid_dist"


def flat_weights(experts: ExpertPair) -> torch.Tensor:
    gate_up, down = experts
    return torch.cat([gate_up.flatten(1), down.flatten(1)], dim=1).float()


@register_metric("weight_l2")
def weight_l2(a: ExpertPair, b: ExpertPair, layer_inputs: torch.Tensor | None, hidden_act: str) -> torch.Tensor:
    """The paper's metric: L2 distance between flattened weights."""
    return torch.cdist(flat_weights(a), flat_weights(b), compute_mode=EXACT)


@register_metric("weight_cosine")
def weight_cosine(a: ExpertPair, b: ExpertPair, layer_inputs: torch.Tensor | None, hidden_act: str) -> torch.Tensor:
    """1 - cosine similarity of flattened weights: blind to scale, so comparable across layers."""
    return (1 - F.normalize(flat_weights(a), dim=1) @ F.normalize(flat_weights(b), dim=1).T).clamp(min=0)


def expert_outputs(experts: ExpertPair, inputs: torch.Tensor, hidden_act: str) -> torch.Tensor:
    """Every expert's output on the same inputs: [E, n, H]."""
    from transformers.activations import ACT2FN

    gate_up, down = (tensor.float() for tensor in experts)
    gate, up = torch.einsum("nh,eoh->eno", inputs.float(), gate_up).chunk(2, dim=-1)
    return torch.einsum("eni,ehi->enh", ACT2FN[hidden_act](gate) * up, down)


@register_metric("output", needs_calibration=True)
def output_distance(a: ExpertPair, b: ExpertPair, layer_inputs: torch.Tensor | None, hidden_act: str) -> torch.Tensor:
    """Relative distance between experts' outputs on the calibration hidden states of this layer:
    ||f_a(X) - f_b(X)|| / ||f_a(X)||, the signal MoE-merging work finds most robust."""
    if layer_inputs is None:
        raise ValueError("The 'output' metric needs calibration data.")
    outputs_a = expert_outputs(a, layer_inputs, hidden_act).flatten(1)
    outputs_b = expert_outputs(b, layer_inputs, hidden_act).flatten(1)
    scale = outputs_a.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.cdist(outputs_a, outputs_b, compute_mode=EXACT) / scale


__all__ = ["NEEDS_CALIBRATION", "SIMILARITY_METRICS", "get_metric", "register_metric"]
