"""`consolidate()`: N Mixtral fine-tunes -> one multi-tenant model whose close experts are shared.

1. Open the tenants (lazily) and check them; run calibration if any option needs it.
2. Per layer: distances between every tenant's experts and the anchor tenant's, then groups. The
   anchor is the first tenant, a named one, or the most sensitive one (found by a probe build).
3. Rank every (layer, group, tenant) candidate merge by distance, across all layers, and take the
   closest first until the threshold, the memory budget or the quality guard says stop.
4. Assemble the model, layer by layer, merging each group's chosen members with the merge rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..assembly import TenantSet, assemble
from ..checkpoints import TenantSource, is_expert_key
from ..modeling import MultiTenantMixtralForCausalLM
from .calibration import CalibrationStats, collect, language_model_loss, per_tenant_data
from .grouping import ExpertGroup, get_grouping
from .merging import NEEDS_USAGE, MergeGroup, get_merge
from .report import ConsolidationReport, LayerReport
from .similarity import NEEDS_CALIBRATION, get_metric

DEFAULT_THRESHOLD = 0.0  # with no limit given, only identical experts are shared: lossless
LOSS_NOISE = 1e-6  # absolute loss difference that floating-point order alone can cause
ANCHOR_RULES = ("first", "most_sensitive")


@dataclass(frozen=True, order=True)
class Candidate:
    """Merging `tenant`'s member of group `group` in layer `layer` into that group's entry."""

    distance: float
    layer: int
    group: int
    tenant: str


def needs_calibration(similarity: str, merge: str, anchor: str = "first", max_quality_loss: float | None = None) -> bool:
    """Whether these `consolidate` settings need calibration data."""
    return (
        similarity in NEEDS_CALIBRATION or merge in NEEDS_USAGE or max_quality_loss is not None or anchor == "most_sensitive"
    )


def parse_budget(memory_budget: int | float | str | None, one_model_bytes: int) -> int | None:
    """Bytes from an int, or from a multiple of one source model such as "1.25x"."""
    if memory_budget is None:
        return None
    if isinstance(memory_budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*x\s*", memory_budget)
        if match:
            return int(float(match.group(1)) * one_model_bytes)
        if memory_budget.strip().isdigit():
            return int(memory_budget)
        raise ValueError(f"memory_budget {memory_budget!r}: give bytes (an int) or a multiple of one model, e.g. '1.25x'.")
    if isinstance(memory_budget, (int, float)) and memory_budget > 0:
        return int(memory_budget)
    raise ValueError(f"memory_budget must be positive, got {memory_budget!r}.")


class Planner:
    """Everything decided before assembly: groups per layer, ranked candidates, bytes."""

    def __init__(
        self, tenants: TenantSet, anchor: str, metric: str, grouping: str, stats: CalibrationStats | None, progress: bool
    ):
        self.tenants = tenants
        self.anchor = anchor
        self.others = [name for name in tenants.names if name != anchor]
        self.metric, self.grouping, self.progress = metric, grouping, progress
        config = tenants.reference
        self.experts = config.num_local_experts
        itemsize = torch.empty((), dtype=tenants.dtype).element_size()
        self.expert_bytes = 3 * config.intermediate_size * config.hidden_size * itemsize
        self.own_bytes = {}
        for name, checkpoint in tenants.checkpoints.items():
            keys = [k for k in tenants.shapes if not is_expert_key(k)]
            if checkpoint.tie_word_embeddings:
                keys.remove("lm_head.weight")
            self.own_bytes[name] = sum(math.prod(tenants.shapes[k]) for k in keys) * itemsize
        self.one_model_experts_bytes = tenants.num_layers * self.experts * self.expert_bytes
        self.one_model_bytes = self.own_bytes[tenants.names[0]] + self.one_model_experts_bytes
        self.sources_bytes = sum(self.own_bytes.values()) + len(tenants.names) * self.one_model_experts_bytes

        measure, group = get_metric(metric), get_grouping(grouping)
        self.groups: list[list[ExpertGroup]] = []
        self.compared_distances: list[torch.Tensor] = []
        layers = range(tenants.num_layers)
        for layer_idx in tqdm(layers, desc="similarity", disable=not progress):
            experts = tenants.layer_experts(layer_idx)
            distances = {
                name: measure(experts[name], experts[self.anchor], self.inputs(stats, name, layer_idx), config.hidden_act)
                for name in self.others
            }
            self.groups.append(group(self.anchor, distances))
            self.compared_distances.append(distances[self.others[0]])
        self.candidates = sorted(
            Candidate(group.distances[name], layer_idx, group_idx, name)
            for layer_idx, groups in enumerate(self.groups)
            for group_idx, group in enumerate(groups)
            for name in self.others
        )

    def inputs(self, stats: CalibrationStats | None, name: str, layer_idx: int) -> torch.Tensor | None:
        """What both tenants of a candidate merge feed this layer's experts: the merged expert
        would serve both."""
        if stats is None:
            return None
        return torch.cat([stats.layer_inputs[name][layer_idx], stats.layer_inputs[self.anchor][layer_idx]])

    def total_bytes(self, merges: int) -> int:
        experts = len(self.tenants.names) * self.tenants.num_layers * self.experts - merges
        return sum(self.own_bytes.values()) + experts * self.expert_bytes

    def merges_for_budget(self, budget: int) -> int:
        return max(0, math.ceil((self.total_bytes(0) - budget) / self.expert_bytes))


@dataclass(frozen=True)
class Plan:
    """The candidates a threshold allows (closest first) and how many of them to merge."""

    planner: Planner
    allowed: list[Candidate]
    count: int
    deciding: str

    @classmethod
    def within(cls, planner: Planner, threshold: float | None, budget: int | None) -> Plan:
        allowed = [c for c in planner.candidates if threshold is None or c.distance <= threshold]
        if budget is None:
            return cls(planner, allowed, len(allowed), "threshold")
        needed = planner.merges_for_budget(budget)
        if needed > len(allowed):
            limit = f"within threshold {threshold}" if threshold is not None else "at all"
            raise ValueError(
                f"memory_budget of {budget} bytes is unreachable {limit}: sharing every allowed expert leaves "
                f"{planner.total_bytes(len(allowed))} bytes."
            )
        identical = sum(1 for c in allowed if c.distance == 0)  # sharing these costs no quality
        return cls(planner, allowed, max(needed, identical), "memory_budget")


def pool_builder(planner: Planner, chosen: Sequence[Candidate], merge: str, stats: CalibrationStats | None):
    """The pool of each layer: one entry per group (its anchor and merged members), plus one entry
    for every member that stays on its own."""
    rule = get_merge(merge)
    merged = {(c.layer, c.group, c.tenant) for c in chosen}

    def build(layer_idx, experts):
        pool, maps = [], {name: [0] * planner.experts for name in planner.tenants.names}
        for group_idx, group in enumerate(planner.groups[layer_idx]):
            joined = [planner.anchor] + [t for t in planner.others if (layer_idx, group_idx, t) in merged]
            members = [(experts[t][0][group.members[t]], experts[t][1][group.members[t]]) for t in joined]
            evidence = {}
            if stats is not None:
                evidence["usage"] = [float(stats.usage[t][layer_idx, group.members[t]]) for t in joined]
                evidence["inputs"] = [stats.layer_inputs[t][layer_idx] for t in joined]
            pool.append(rule(MergeGroup(members, hidden_act=planner.tenants.reference.hidden_act, **evidence)))
            for tenant in joined:
                maps[tenant][group.members[tenant]] = len(pool) - 1
            for tenant in planner.others:
                if tenant not in joined:
                    local = group.members[tenant]
                    pool.append((experts[tenant][0][local], experts[tenant][1][local]))
                    maps[tenant][local] = len(pool) - 1
        return pool, maps

    return build


def most_sensitive_plan(
    plan: Plan,
    losses: Callable[[MultiTenantMixtralForCausalLM], dict[str, float]],
    build: Callable[..., MultiTenantMixtralForCausalLM],
    stats: CalibrationStats,
    threshold: float | None,
    budget: int | None,
) -> tuple[Plan, str]:
    """Re-plan around the tenant whose loss rises most when the groups are averaged; also returns
    the report's note on the choice.

    The probe merges every allowed candidate, not only the planned ones, and averages each group:
    without a threshold every group then holds every tenant, so all tenants' experts change alike
    (merging only the planned candidates would change the first tenant's, around which the groups
    are built, in more groups than the others'). The rise is absolute (nats per scored token): a
    ratio explodes for a tenant whose loss is near 0.
    """
    planner = plan.planner
    if not any(c.distance > 0 for c in plan.allowed[: plan.count]):
        return plan, f"anchor {planner.anchor!r}: no probe, only identical experts are shared"
    probe = losses(build(plan, len(plan.allowed), "average"))
    increase = {name: probe[name] - stats.losses[name] for name in planner.tenants.names}
    chosen = max(increase, key=increase.get)
    figures = ", ".join(f"{name} {value:+.4f}" for name, value in increase.items())
    if increase[chosen] <= LOSS_NOISE:
        return plan, f"anchor {planner.anchor!r}: the probe was inconclusive (loss rise, nats per token: {figures})"
    note = f"anchor {chosen!r}: the most sensitive tenant (loss rise, nats per token, every allowed group averaged: {figures})"
    if chosen == planner.anchor:
        return plan, note
    replanned = Planner(planner.tenants, chosen, planner.metric, planner.grouping, stats, planner.progress)
    try:
        return Plan.within(replanned, threshold, budget), note
    except ValueError as error:
        raise ValueError(f"With the groups built around the most sensitive tenant {chosen!r}: {error}") from None


def consolidate(
    models: Mapping[str, TenantSource],
    *,
    similarity: str = "weight_l2",
    grouping: str = "cross_index",
    threshold: float | None = None,
    memory_budget: int | float | str | None = None,
    merge: str = "select",
    anchor: str = "first",
    calibration=None,
    tokenizer=None,
    max_quality_loss: float | None = None,
    default_tenant: str | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    max_calibration_rows: int = 256,
    progress: bool = True,
) -> MultiTenantMixtralForCausalLM:
    """Build one multi-tenant model from N Mixtral fine-tunes, sharing experts that are close.

    Args:
        models: `{tenant name: loaded MixtralForCausalLM, directory or Hub id}`, at least two.
        similarity: a registered metric: `weight_l2` (the paper's), `weight_cosine`, `output`.
        grouping: `cross_index` (optimal assignment of each tenant's experts to the anchor
            tenant's) or `same_index` (expert i with expert i, the paper's).
        threshold: merge only candidates at most this far apart.
        memory_budget: bytes, or a multiple of one source model (`"1.25x"`); merges closest-first
            until the model fits.
        merge: a registered rule: `select` (keep one member), `keep_anchor`, `average`,
            `usage_weighted`, `output_medoid`.
        anchor: the tenant whose experts every group is built around: `"first"`, a tenant name,
            or `"most_sensitive"` (needs calibration): the tenant whose calibration loss rises
            most (absolute, nats per token) when every allowed group is averaged. With
            `keep_anchor` its experts survive unchanged, so the tenant merging would hurt most
            stays lossless.
        calibration: texts (with `tokenizer`) or token ids, shared by all tenants, or a mapping
            `{tenant: texts or ids}` so that each tenant is measured on what it serves (its loss,
            its router usage, the inputs its experts see); needed by `output`,
            `usage_weighted` and `max_quality_loss`.
        max_quality_loss: the largest relative increase of calibration loss any tenant may
            suffer; sharing is undone, farthest merges first, until every tenant is within it.

    With neither `threshold` nor `memory_budget`, only identical experts are shared (threshold 0):
    the result is lossless. The returned model carries `consolidation_report`.
    """
    get_metric(similarity), get_grouping(grouping), get_merge(merge)
    if not isinstance(models, Mapping) or len(models) < 2:
        raise ValueError("consolidate needs at least two tenants; for one, use MultiTenantMixtralForCausalLM.from_models.")
    if anchor not in ANCHOR_RULES and anchor not in models:
        raise ValueError(f"anchor {anchor!r} is neither a tenant ({list(models)}) nor one of {list(ANCHOR_RULES)}.")
    if anchor in ANCHOR_RULES and anchor in models:
        raise ValueError(f"anchor {anchor!r} is ambiguous: it names a rule and a tenant; rename the tenant.")
    if needs_calibration(similarity, merge, anchor, max_quality_loss) and calibration is None:
        raise ValueError(
            f"similarity={similarity!r}, merge={merge!r}, anchor={anchor!r}, max_quality_loss={max_quality_loss!r} "
            "need calibration data."
        )
    if max_quality_loss is not None and max_quality_loss < 0:
        raise ValueError(f"max_quality_loss must be >= 0, got {max_quality_loss}.")
    data = per_tenant_data(calibration, list(models), tokenizer) if calibration is not None else None
    tenants = TenantSet.open(models, default_tenant=default_tenant, dtype=dtype, revision=revision)

    stats = collect(tenants, data, max_calibration_rows) if data is not None else None
    planner = Planner(tenants, tenants.names[0] if anchor in ANCHOR_RULES else anchor, similarity, grouping, stats, progress)
    budget = parse_budget(memory_budget, planner.one_model_bytes)
    if budget is not None and budget < planner.one_model_experts_bytes:
        raise ValueError(
            f"memory_budget of {budget} bytes is smaller than one model's experts ({planner.one_model_experts_bytes} "
            "bytes): no sharing can reach it."
        )
    if threshold is None and budget is None:
        threshold = DEFAULT_THRESHOLD
    plan = Plan.within(planner, threshold, budget)

    def build(plan: Plan, merges: int, rule: str = merge) -> MultiTenantMixtralForCausalLM:
        config, state_dict = assemble(tenants, pool_builder(plan.planner, plan.allowed[:merges], rule, stats))
        return MultiTenantMixtralForCausalLM.from_pretrained(None, config=config, state_dict=state_dict, dtype=tenants.dtype).eval()

    def losses(model) -> dict[str, float]:
        return {name: language_model_loss(model, data[name], tenant=name) for name in tenants.names}

    def within_guard(after: dict[str, float]) -> bool:
        # LOSS_NOISE: the lossless model's loss may differ from the original's in the last bits.
        return all(after[n] <= stats.losses[n] * (1 + max_quality_loss) + LOSS_NOISE for n in tenants.names)

    notes = []
    if anchor == "most_sensitive":
        plan, note = most_sensitive_plan(plan, losses, build, stats, threshold, budget)
        notes.append(note)

    count = plan.count
    model = build(plan, count)
    after = losses(model) if data is not None else None
    deciding = plan.deciding
    if max_quality_loss is not None and not within_guard(after):
        # Bisect the number of merges kept (closest first) for the largest that every tenant accepts.
        low, high = 0, count - 1
        while low < high:
            middle = (low + high + 1) // 2
            if within_guard(losses(build(plan, middle))):
                low = middle
            else:
                high = middle - 1
        if budget is not None:
            raise ValueError(
                f"memory_budget of {budget} bytes is below what max_quality_loss={max_quality_loss} allows: the "
                f"smallest model within it takes {plan.planner.total_bytes(low)} bytes."
            )
        count, deciding = low, "max_quality_loss"
        model = build(plan, count)
        after = losses(model)

    layer_reports = []
    for layer_idx, distances in enumerate(plan.planner.compared_distances):
        merged = [c.distance for c in plan.allowed[:count] if c.layer == layer_idx]
        layer_reports.append(
            LayerReport(
                pool_size=model.config.pool_sizes[layer_idx],
                merged=len(merged),
                mean_merged_distance=sum(merged) / len(merged) if merged else None,
                max_merged_distance=max(merged) if merged else None,
                distances=distances,
            )
        )
    model.consolidation_report = ConsolidationReport(
        settings=dict(similarity=similarity, grouping=grouping, merge=merge, anchor=anchor, threshold=threshold,
                      memory_budget=memory_budget, max_quality_loss=max_quality_loss),
        tenants=list(tenants.names),
        anchor=plan.planner.anchor,
        compared=plan.planner.others[0],
        layers=layer_reports,
        bytes_before=planner.sources_bytes,
        bytes_after=plan.planner.total_bytes(count),
        deciding_limit=deciding,
        loss_before=stats.losses if stats is not None else None,
        loss_after=after,
        notes=notes,
    )
    return model


__all__ = ["consolidate", "needs_calibration", "parse_budget"]
