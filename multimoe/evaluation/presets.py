"""Named consolidation settings the quality table compares, and the calibration text they use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import MixtralForCausalLM

from ..consolidation import consolidate
from ..modeling import MultiTenantMixtralForCausalLM
from ..testbed import TASKS

# The paper's algorithm: same-index experts, weight L2 distance, keep one member unchanged.
PAPER = dict(similarity="weight_l2", grouping="same_index", merge="select")
# multimoe's best on the testbed: what the experts compute on task data decides, merges are averaged
# by how much each tenant relies on its member.
BEST = dict(similarity="output", grouping="cross_index", merge="usage_weighted")
PRESETS = {"multimoe": BEST, "paper": PAPER}
CALIBRATION_SEED = 7


def calibration_texts(tasks: Sequence[str], per_task: int = 64) -> list[str]:
    """Prompt + answer texts from the tasks' training distribution (never a held-out prompt)."""
    return [e.prompt + e.answer for name in tasks for e in TASKS[name].training(per_task, seed=CALIBRATION_SEED)]


def consolidate_preset(
    models: Mapping[str, MixtralForCausalLM], preset: str, memory_budget: str, tokenizer
) -> MultiTenantMixtralForCausalLM:
    """`consolidate` with a named preset; each tenant is calibrated on its own task's training
    prompts, so distances, usage and losses reflect what that tenant serves."""
    settings = PRESETS[preset]
    needs_data = settings["similarity"] == "output" or settings["merge"] == "usage_weighted"
    return consolidate(
        dict(models),
        **settings,
        memory_budget=memory_budget,
        calibration={name: calibration_texts([name]) for name in models} if needs_data else None,
        tokenizer=tokenizer if needs_data else None,
        progress=False,
    )


__all__ = ["BEST", "PAPER", "PRESETS", "calibration_texts", "consolidate_preset"]
