"""The shipped testbeds as the quality report sees them: where the tasks and checkpoints are, how a
tenant's answers are scored, and which presets it compares.

    from multimoe.evaluation.testbeds import TESTBEDS
    switch = TESTBEDS["switch"]
    switch.score(switch.load("title"), switch.tokenizer(), switch.tasks["title"].held_out(20))
    # {"rouge1": ..., "rouge2": ..., "rougeL": ...}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

from .. import testbed as mixtral_testbed
from ..testbed import Example, Task
from ..testbed import divergent as divergent_testbed
from ..testbed import switch as switch_testbed
from .harness import exact_match
from .rouge import ROUGE_TYPES, rouge_scores

Scorer = Callable[..., dict[str, float]]  # (model, tokenizer, examples, *, tenant=None) -> {metric: value}


def exact_match_scores(model, tokenizer, examples: Sequence[Example], *, tenant: str | None = None) -> dict[str, float]:
    """`exact_match` as a one-metric score: {"exact_match": fraction}."""
    return {"exact_match": exact_match(model, tokenizer, examples, tenant=tenant)}


@dataclass(frozen=True)
class Testbed:
    """A shipped testbed: `module` holds `TASKS`, `BASE`, `tokenizer()` and `load(name)`; `score`
    gives every metric of `metrics` (the first is the headline one the goal reads)."""

    name: str
    module: ModuleType
    family: str  # the model family, in words
    make_script: str  # the script that made the checkpoints
    score: Scorer
    metrics: tuple[str, ...]
    metric_labels: tuple[str, ...]  # how the report names each metric
    presets: tuple[str, ...]  # keys of `presets.PRESETS` the report compares, "multimoe" first
    tenant_counts: tuple[int, ...]  # the tenant counts the report covers by default

    @property
    def tasks(self) -> Mapping[str, Task]:
        return self.module.TASKS

    @property
    def base(self) -> str:
        return self.module.BASE

    def tokenizer(self):
        return self.module.tokenizer()

    def load(self, name: str):
        return self.module.load(name)


TESTBEDS: dict[str, Testbed] = {
    "mixtral": Testbed(
        name="mixtral",
        module=mixtral_testbed,
        family="Mixtral",
        make_script="scripts/make_testbed.py",
        score=exact_match_scores,
        metrics=("exact_match",),
        metric_labels=("exact match",),
        presets=("multimoe", "paper"),
        tenant_counts=(2, 3, 4),
    ),
    "switch": Testbed(
        name="switch",
        module=switch_testbed,
        family="Switch Transformers",
        make_script="scripts/make_switch_testbed.py",
        score=rouge_scores,
        metrics=ROUGE_TYPES,
        metric_labels=("ROUGE-1", "ROUGE-2", "ROUGE-L"),
        presets=("multimoe", "paper"),
        tenant_counts=(1, 2, 3, 4),
    ),
    "divergent": Testbed(
        name="divergent",
        module=divergent_testbed,
        family="Mixtral",
        make_script="scripts/make_divergent_testbed.py",
        score=exact_match_scores,
        metrics=("exact_match",),
        metric_labels=("exact match",),
        presets=("multimoe", "paper"),
        tenant_counts=(4,),
    ),
}


__all__ = ["TESTBEDS", "Testbed", "exact_match_scores"]
