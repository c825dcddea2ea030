"""Named consolidation settings the quality table compares, and the calibration text they use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedModel

from ..consolidation import consolidate, needs_calibration
from ..modeling import MultiTenantForCausalLM
from ..testbed import TASKS

# The paper's algorithm: same-index experts, weight L2 distance, keep one member unchanged.
PAPER = dict(similarity="weight_l2", grouping="same_index", merge="select")
# multimoe's best on the testbed: groups are built around the tenant that merging hurts most (found
# by a probe on each tenant's own calibration data) and keep its experts unchanged; which experts
# join a group is decided by what they compute on task data.
BEST = dict(similarity="output", grouping="cross_index", merge="keep_anchor", anchor="most_sensitive")
PRESETS = {"multimoe": BEST, "paper": PAPER}
CALIBRATION_SEED = 7


def calibration_pairs(tasks: Sequence[str], per_task: int = 64) -> list[dict[str, str]]:
    """Prompt/completion pairs from the tasks' training distribution (never a held-out prompt):
    a tenant's calibration loss is then its loss on the answers it must get right."""
    return [
        {"prompt": e.prompt, "completion": e.answer}
        for name in tasks
        for e in TASKS[name].training(per_task, seed=CALIBRATION_SEED)
    ]


def consolidate_preset(
    models: Mapping[str, PreTrainedModel], preset: str, memory_budget: str, tokenizer
) -> MultiTenantForCausalLM:
    """`consolidate` with a named preset; each tenant is calibrated on its own task's training
    prompts, so distances, usage and losses reflect what that tenant serves."""
    settings = PRESETS[preset]
    needs_data = needs_calibration(settings["similarity"], settings["merge"], settings.get("anchor", "first"))
    return consolidate(
        dict(models),
        **settings,
        memory_budget=memory_budget,
        calibration={name: calibration_pairs([name]) for name in models} if needs_data else None,
        tokenizer=tokenizer if needs_data else None,
        progress=False,
    )


__all__ = ["BEST", "PAPER", "PRESETS", "calibration_pairs", "consolidate_preset"]
