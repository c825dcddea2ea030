"""Named consolidation settings the quality table compares, and the calibration text they use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedModel

from ..consolidation import consolidate, needs_calibration, parse_budget
from ..modeling import MultiTenantForCausalLM, MultiTenantLM
from ..testbed import TASKS, Task

# The paper's algorithm: same-index experts, weight L2 distance, keep one member unchanged.
PAPER = dict(similarity="weight_l2", grouping="same_index", merge="select")
# multimoe's best on the testbed: groups are built around the tenant that merging hurts most (found
# by a probe on each tenant's own calibration data) and keep its experts unchanged; which experts
# join a group is decided by what they compute on task data.
BEST = dict(similarity="output", grouping="cross_index", merge="keep_anchor", anchor="most_sensitive")
# For fine-tunes whose experts diverged (docs/quality-divergent.md): low-rank deltas within the
# budget, spent on the tenants recovery cannot bring back, and distillation recovery afterwards.
# (Loss-aware allocation on top did worse there: see the report.)
DIVERGENT = dict(BEST, delta_rank="auto", recover_steps=200)
PRESETS = {"multimoe": BEST, "paper": PAPER, "multimoe-divergent": DIVERGENT}
CALIBRATION_SEED = 7


def calibration_pairs(
    tasks: Sequence[str], per_task: int = 64, *, registry: Mapping[str, Task] = TASKS
) -> list[dict[str, str]]:
    """Prompt/completion pairs from the tasks' training distribution (never a held-out prompt):
    a tenant's calibration loss is then its loss on the answers it must get right. `registry` maps
    task names to tasks: the Mixtral testbed's `TASKS` unless given (e.g. `testbed.switch.TASKS`)."""
    return [
        {"prompt": e.prompt, "completion": e.answer}
        for name in tasks
        for e in registry[name].training(per_task, seed=CALIBRATION_SEED)
    ]


def consolidate_preset(
    models: Mapping[str, PreTrainedModel], preset: str, memory_budget: str, tokenizer, *,
    registry: Mapping[str, Task] = TASKS,
) -> MultiTenantLM:
    """`consolidate` with a named preset; each tenant is calibrated on its own task's training
    prompts (tasks looked up by tenant name in `registry`), so distances, usage and losses reflect
    what that tenant serves.

    One tenant has nothing to share with (`consolidate` needs two): it is served alone, losslessly
    (`from_models`), whatever the preset; a budget below that model's memory raises ValueError,
    as an unreachable budget does for several tenants."""
    settings = PRESETS[preset]
    if len(models) == 1:
        model = MultiTenantForCausalLM.from_models(dict(models)).eval()
        report = model.memory_report()
        if report.total_bytes > parse_budget(memory_budget, report.source_models_bytes):
            raise ValueError(
                f"memory_budget {memory_budget!r} is below one tenant served alone "
                f"({report.total_bytes / report.source_models_bytes:.2f}x its own model)."
            )
        return model
    needs_data = needs_calibration(
        settings["similarity"], settings["merge"], settings.get("anchor", "first"), None,
        settings.get("allocation", "distance"), settings.get("recover_steps", 0),
    )
    return consolidate(
        dict(models),
        **settings,
        memory_budget=memory_budget,
        calibration={name: calibration_pairs([name], registry=registry) for name in models} if needs_data else None,
        tokenizer=tokenizer if needs_data else None,
        progress=False,
    )


__all__ = ["BEST", "DIVERGENT", "PAPER", "PRESETS", "calibration_pairs", "consolidate_preset"]
