"""`consolidate()`: N fine-tunes of one MoE model -> one multi-tenant model whose close experts are shared.

1. Open the tenants (lazily) and check them; run calibration if any option needs it.
2. Per sparse layer: distances between every tenant's experts and the anchor tenant's, then groups. The
   anchor is the first tenant, a named one, or the most sensitive one (found by a probe build).
3. Rank every (layer, group, tenant) candidate merge by distance, across all layers, and take the
   closest first until the threshold, the memory budget or the quality guard says stop (or none
   does: every candidate is merged, or a budget that does not bind keeps only identical experts).
4. Assemble the model, layer by layer, merging each group's chosen members with the merge rule.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from ..assembly import ExpertTensors, TenantSet, assemble, check_settings
from ..checkpoints import TenantSource
from ..modeling import MultiTenantLM, classes_for
from ..validation import check_number
from .allocation import ALLOCATIONS, measured_rises
from .calibration import CalibrationStats, collect, language_model_loss, per_tenant_data
from .deltas import DeltaCost, auto_ranks, check_delta_rank, energy_gains, layer_delta_state
from .grouping import ExpertGroup, get_grouping
from .merging import KEEPS_A_MEMBER, NEEDS_USAGE, MergeGroup, get_merge, identical
from .recovery import recover
from .report import ConsolidationReport, LayerReport
from .similarity import NEEDS_CALIBRATION, expert_runner, get_metric

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


def needs_calibration(
    similarity: str,
    merge: str,
    anchor: str = "first",
    max_quality_loss: float | None = None,
    allocation: str = "distance",
    recover_steps: int = 0,
) -> bool:
    """Whether these `consolidate` settings need calibration data."""
    return (
        similarity in NEEDS_CALIBRATION
        or merge in NEEDS_USAGE
        or max_quality_loss is not None
        or anchor == "most_sensitive"
        or allocation == "loss"
        or bool(recover_steps)
    )


@dataclass(frozen=True)
class MemoryBudget:
    """A memory budget as given, checked before any tenant is opened: bytes, or a multiple of one
    source model (`per_model`), whose size is known only once the tenants are open."""

    amount: float
    per_model: bool

    @classmethod
    def parse(cls, memory_budget: int | float | str) -> MemoryBudget:
        if not isinstance(memory_budget, str):
            return cls(check_number("memory_budget", memory_budget, positive=True), per_model=False)
        text = memory_budget.strip()
        try:
            amount = float(text.removesuffix("x"))
        except ValueError:
            raise ValueError(
                f"memory_budget {memory_budget!r}: give bytes (a number) or a multiple of one model, e.g. '1.25x'."
            ) from None
        return cls(check_number(f"memory_budget {memory_budget!r}", amount, positive=True), text.endswith("x"))

    def bytes(self, one_model_bytes: int) -> int:
        return int(self.amount * one_model_bytes) if self.per_model else int(self.amount)


def parse_budget(memory_budget: int | float | str | None, one_model_bytes: int) -> int | None:
    """Bytes from a number of bytes, or from a multiple of one source model such as "1.25x"."""
    return None if memory_budget is None else MemoryBudget.parse(memory_budget).bytes(one_model_bytes)


@dataclass(frozen=True)
class Footprint:
    """Sizes in bytes, known from the tenants' configs alone: a budget that no sharing can reach is
    refused before any weight is read."""

    own: dict[str, int]  # each tenant's non-expert parameters (a tied lm_head is stored once)
    expert: int  # one expert
    experts_per_model: int  # layers x experts
    delta: DeltaCost  # bytes of low-rank deltas

    @classmethod
    def of(cls, tenants: TenantSet) -> Footprint:
        itemsize = torch.empty((), dtype=tenants.dtype).element_size()
        own = {name: sum(math.prod(tenants.shapes[k]) for k in tenants.own_keys(name)) * itemsize for name in tenants.names}
        sparse_layer = tenants.sparse_layers.index(True)
        expert_keys = tenants.checkpoints[tenants.names[0]].expert_keys(sparse_layer)
        num_experts = tenants.shapes[expert_keys[0]][0]
        expert = sum(math.prod(tenants.shapes[key][1:]) for key in expert_keys) * itemsize
        delta = DeltaCost.of([tenants.shapes[key][1:] for key in expert_keys], itemsize)
        return cls(own, expert, sum(tenants.sparse_layers) * num_experts, delta)

    @property
    def one_model(self) -> int:
        """One source model, the first tenant, as `"1.25x"` budgets count it."""
        return next(iter(self.own.values())) + self.experts_per_model * self.expert

    @property
    def smallest(self) -> int:
        """Every expert shared: each tenant's own layers plus one model's experts."""
        return self.total((len(self.own) - 1) * self.experts_per_model)

    def total(self, merges: int) -> int:
        """The consolidated model once `merges` local experts have joined another tenant's entry."""
        return sum(self.own.values()) + (len(self.own) * self.experts_per_model - merges) * self.expert

    def merges_for(self, budget: int) -> int:
        return max(0, math.ceil((self.total(0) - budget) / self.expert))

    def describe(self, size: int) -> str:
        return f"{size} bytes ({size / self.one_model:.3g}x one model)"

    def unreachable(self, budget: int, reason: str, smallest: int) -> ValueError:
        """The error for a budget below `smallest`, with the least budget string that reaches it:
        the multiple rounded up to two decimals, which `MemoryBudget` turns into enough bytes."""
        hundredths = math.ceil(smallest / self.one_model * 100)
        if int(hundredths / 100 * self.one_model) < smallest:  # the float fell just below the exact decimal
            hundredths += 1
        return ValueError(
            f"memory_budget of {self.describe(budget)} is unreachable {reason} {self.describe(smallest)}; the "
            f"smallest reachable budget is '{hundredths / 100:g}x'."
        )


class Planner:
    """Everything decided before assembly: groups per layer (none in a dense layer), ranked
    candidates, bytes."""

    def __init__(
        self,
        tenants: TenantSet,
        footprint: Footprint,
        anchor: str,
        metric: str,
        grouping: str,
        stats: CalibrationStats | None,
        progress: bool,
        spectra: bool = False,
    ):
        self.tenants, self.footprint = tenants, footprint
        self.anchor, self.spectra = anchor, spectra
        # (layer, group, tenant) -> the energy each rank of a delta would capture (`delta_rank="auto"`)
        self.gains: dict[tuple[int, int, str], torch.Tensor] = {}
        self.rises: dict[tuple[int, int, str], float] | None = None  # `allocation="loss"`
        # tenant -> how much its candidates count for delta ranks (`recovery_weights`); all 1 unless set
        self.tenant_weights: dict[str, float] | None = None
        self.others = [name for name in tenants.names if name != anchor]
        self.metric, self.grouping, self.progress = metric, grouping, progress
        self.experts = tenants.checkpoints[tenants.names[0]].num_experts
        self.run_experts = expert_runner(tenants.family, tenants.reference)
        measure, group = get_metric(metric), get_grouping(grouping)
        self.groups: list[list[ExpertGroup]] = [[] for _ in range(tenants.num_layers)]
        self.compared_distances: dict[int, torch.Tensor] = {}  # sparse layer -> [E, E]
        sparse = [layer_idx for layer_idx, is_sparse in enumerate(tenants.sparse_layers) if is_sparse]
        for layer_idx in tqdm(sparse, desc="similarity", disable=not progress):
            experts = tenants.layer_experts(layer_idx)
            distances = {
                name: measure(experts[name], experts[self.anchor], self.inputs(stats, name, layer_idx), self.run_experts)
                for name in self.others
            }
            self.groups[layer_idx] = group(self.anchor, distances)
            self.compared_distances[layer_idx] = distances[self.others[0]]
            if spectra:
                for group_idx, expert_group in enumerate(self.groups[layer_idx]):
                    index = expert_group.members
                    anchor_member = [tensor[index[self.anchor]].float() for tensor in experts[self.anchor]]
                    for name in self.others:
                        difference = [t[index[name]].float() - a for t, a in zip(experts[name], anchor_member)]
                        self.gains[layer_idx, group_idx, name] = energy_gains(difference, footprint.delta.max_rank)
        self.candidates = sorted(
            Candidate(group.distances[name], layer_idx, group_idx, name)
            for layer_idx, groups in enumerate(self.groups)
            for group_idx, group in enumerate(groups)
            for name in self.others
        )

    def importance(self, candidate: Candidate) -> float:
        """How much merging `candidate` is expected to cost, on a scale shared by all candidates:
        its measured loss rise (`allocation="loss"`), else its squared distance; times its tenant's
        weight where recovery will follow (`recovery_weights`). What `delta_rank="auto"` weighs a
        delta's recovered energy by."""
        cost = max(self.rises[key_of(candidate)], 0.0) if self.rises is not None else candidate.distance**2
        return cost if self.tenant_weights is None else cost * self.tenant_weights[candidate.tenant]

    def allocate(self, rises: dict[tuple[int, int, str], float]) -> None:
        """Rank the candidates by their measured loss rise, cheapest first (identical ones, which
        cost nothing, always first)."""
        self.rises = rises
        self.candidates.sort(key=lambda c: (c.distance > 0, rises[key_of(c)], c.distance))

    def inputs(self, stats: CalibrationStats | None, name: str, layer_idx: int) -> torch.Tensor | None:
        """What both tenants of a candidate merge feed this layer's experts: the merged expert
        would serve both."""
        if stats is None:
            return None
        return torch.cat([stats.layer_inputs[name][layer_idx], stats.layer_inputs[self.anchor][layer_idx]])


@dataclass(frozen=True)
class DeltaSettings:
    """`consolidate(delta_rank=...)`: a rank for every merged expert, or `"auto"`; and whether the
    merge rule keeps one member unchanged (that member needs no delta), else every member of a
    touched group gets one."""

    rank: int | str
    keeps_member: bool


CandidateKey = tuple[int, int, str]  # (layer, group, tenant)


def key_of(candidate: Candidate) -> CandidateKey:
    return candidate.layer, candidate.group, candidate.tenant


@dataclass(frozen=True)
class Plan:
    """The candidates a threshold allows (closest first), how many of them to merge, which limit
    stopped further merging (the report's `deciding_limit`), and the rank of each merged
    candidate's delta (none without `delta_rank`)."""

    planner: Planner
    allowed: list[Candidate]
    count: int
    deciding: str
    deltas: DeltaSettings | None = None
    ranks: dict[CandidateKey, int] = field(default_factory=dict)

    @classmethod
    def within(
        cls, planner: Planner, threshold: float | None, budget: int | None, deltas: DeltaSettings | None = None
    ) -> Plan:
        allowed = [c for c in planner.candidates if threshold is None or c.distance <= threshold]
        if budget is None:
            everything = len(allowed) == len(planner.candidates)
            deciding = "none (every expert shared)" if everything else "threshold"
            return cls(planner, allowed, len(allowed), deciding, deltas, fixed_ranks(allowed, deltas))
        footprint = planner.footprint
        if footprint.total(len(allowed)) > budget:  # without a threshold, refused before planning
            raise footprint.unreachable(
                budget, f"within threshold {threshold}: sharing every expert within it leaves",
                footprint.total(len(allowed)),
            )
        needed = footprint.merges_for(budget)
        identical = sum(1 for c in allowed if c.distance == 0)  # sharing these costs no quality
        if needed <= identical:
            return cls(planner, allowed, identical, "none (identical experts only; the budget does not bind)", deltas)
        if deltas is None:
            return cls(planner, allowed, needed, "memory_budget")
        if deltas.rank == "auto":
            count, ranks = auto_plan(planner, allowed, needed, budget)
            return cls(planner, allowed, count, "memory_budget", deltas, ranks)
        for count in range(needed, len(allowed) + 1):  # each merge frees an expert and may cost a delta
            ranks = fixed_ranks(allowed[:count], deltas)
            if footprint.total(count) + delta_bytes(footprint, ranks, deltas) <= budget:
                return cls(planner, allowed, count, "memory_budget", deltas, ranks)
        smallest = footprint.total(len(allowed)) + delta_bytes(footprint, fixed_ranks(allowed, deltas), deltas)
        raise footprint.unreachable(budget, f"with deltas of rank {deltas.rank}: sharing every expert leaves", smallest)


def fixed_ranks(merged: Sequence[Candidate], deltas: DeltaSettings | None) -> dict[CandidateKey, int]:
    """`delta_rank=<int>`: that rank for every merged candidate that differs from its entry: one
    that differs from the anchor's member where the rule keeps a member; with a rule that changes
    every member, every merged candidate of a group where any differs."""
    if deltas is None or deltas.rank == "auto":
        return {}
    touched = {(c.layer, c.group) for c in merged if c.distance > 0}
    if deltas.keeps_member:
        return {key_of(c): deltas.rank for c in merged if c.distance > 0}
    return {key_of(c): deltas.rank for c in merged if (c.layer, c.group) in touched}


def delta_bytes(footprint: Footprint, ranks: Mapping[CandidateKey, int], deltas: DeltaSettings | None) -> int:
    """Bytes of the planned deltas; where the merge rule changes every member, each touched group's
    anchor member needs one too (of its group's largest rank)."""
    if deltas is None:
        return 0
    planned = footprint.delta.bytes(list(ranks.values()))
    if deltas.keeps_member:
        return planned
    largest: dict[tuple[int, int], int] = {}
    for (layer, group, _), rank in ranks.items():
        largest[layer, group] = max(rank, largest.get((layer, group), 0))
    return planned + footprint.delta.bytes(list(largest.values()))


# At most this many merge counts are tried by `delta_rank="auto"`, evenly spread.
AUTO_MERGE_COUNTS = 64


def auto_plan(
    planner: Planner, allowed: list[Candidate], needed: int, budget: int
) -> tuple[int, dict[CandidateKey, int]]:
    """`delta_rank="auto"`: how many candidates to merge and the rank of each merged one's delta.
    Each merge beyond the `needed` ones frees an expert's bytes for ranks; the count chosen leaves
    the least estimated harm: the merged candidates' importance, less what their ranks recover
    (`deltas.auto_ranks`)."""
    footprint = planner.footprint
    step = max(1, (len(allowed) - needed) // AUTO_MERGE_COUNTS)
    best = None
    for count in [*range(needed, len(allowed), step), len(allowed)]:
        merged = [c for c in allowed[:count] if c.distance > 0]
        importance = [planner.importance(c) for c in merged]
        ranks, recovered = auto_ranks(
            importance, [planner.gains[key_of(c)] for c in merged], budget - footprint.total(count), footprint.delta
        )
        harm = sum(importance) - recovered
        if best is None or harm < best[0]:
            best = harm, count, {key_of(c): rank for c, rank in zip(merged, ranks) if rank}
    return best[1], best[2]


def pool_builder(plan: Plan, merges: int, merge: str, stats: CalibrationStats | None):
    """The pool of each sparse layer: one entry per group (its anchor and merged members), plus one
    entry for every member that stays on its own; and, with `delta_rank`, each merged member's delta
    against its entry."""
    planner, rule = plan.planner, get_merge(merge)
    merged = {key_of(c) for c in plan.allowed[:merges]}
    names = planner.tenants.family.expert_parameter_names(planner.tenants.reference)

    def build(layer_idx: int, experts: dict[str, ExpertTensors]):
        def member(tenant: str, group: ExpertGroup) -> ExpertTensors:
            return tuple(tensor[group.members[tenant]] for tensor in experts[tenant])

        pool, maps = [], {name: [0] * planner.experts for name in planner.tenants.names}
        ranks = {name: [0] * planner.experts for name in planner.tenants.names}
        for group_idx, group in enumerate(planner.groups[layer_idx]):
            joined = [planner.anchor] + [t for t in planner.others if (layer_idx, group_idx, t) in merged]
            evidence = {}
            if stats is not None:
                evidence["usage"] = [float(stats.usage[t][layer_idx, group.members[t]]) for t in joined]
                evidence["inputs"] = [stats.layer_inputs[t][layer_idx] for t in joined]
            members = [member(t, group) for t in joined]
            pool.append(rule(MergeGroup(members, run_experts=planner.run_experts, **evidence)))
            planned = [plan.ranks.get((layer_idx, group_idx, t), 0) for t in joined]
            unchanged = [identical([tensors, pool[-1]]) for tensors in members]
            kept = [rank for rank, same in zip(planned, unchanged) if same]
            for tenant, rank, same in zip(joined, planned, unchanged):
                maps[tenant][group.members[tenant]] = len(pool) - 1
                if tenant == planner.anchor and plan.deltas is not None:
                    # The anchor is no candidate: it takes the rank planned for the member the rule
                    # kept (which needs none), or, where the rule keeps none, the group's largest
                    # (both as `delta_bytes` counts them).
                    rank = max(kept) if kept else max(planned)
                if rank and not same:
                    ranks[tenant][group.members[tenant]] = rank
            for tenant in planner.others:
                if tenant not in joined:
                    pool.append(member(tenant, group))
                    maps[tenant][group.members[tenant]] = len(pool) - 1
        deltas = {
            tenant: (row, layer_delta_state(names, experts[tenant], pool, maps[tenant], row))
            for tenant, row in ranks.items()
            if any(row)
        }
        return pool, maps, deltas

    return build


def recovery_weights(
    plan: Plan, build: Callable[..., MultiTenantLM], recovering: Callable
) -> tuple[dict[str, float], str]:
    """Each tenant's KL to its original left after recovering a probe with every allowed candidate
    merged and no deltas, relative to the largest: with `recover_steps`, `delta_rank="auto"` spends
    its bytes where recovery cannot reach (a tenant that recovers in its own layers needs no rank,
    one that cannot needs them all); also returns the report's note."""
    probe = build(replace(plan, deltas=None, ranks={}), len(plan.allowed))
    left = {name: tenant.kl_after for name, tenant in recovering(probe).tenants.items()}
    del probe
    largest = max(left.values())
    weights = {name: value / largest if largest > 0 else 0.0 for name, value in left.items()}
    figures = ", ".join(f"{name} {value:.3g}" for name, value in left.items())
    note = f"delta ranks weighted by the KL each tenant keeps after recovering with every merge made ({figures})"
    return weights, note


def most_sensitive_plan(
    plan: Plan,
    losses: Callable[[MultiTenantLM], dict[str, float]],
    build: Callable[..., MultiTenantLM],
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
    probe = losses(build(replace(plan, deltas=None, ranks={}), len(plan.allowed), "average"))
    increase = {name: probe[name] - stats.losses[name] for name in planner.tenants.names}
    chosen = max(increase, key=increase.get)
    figures = ", ".join(f"{name} {value:+.4f}" for name, value in increase.items())
    if increase[chosen] <= LOSS_NOISE:
        return plan, f"anchor {planner.anchor!r}: the probe was inconclusive (loss rise, nats per token: {figures})"
    note = f"anchor {chosen!r}: the most sensitive tenant (loss rise, nats per token, every allowed group averaged: {figures})"
    if chosen == planner.anchor:
        return plan, note
    replanned = Planner(
        planner.tenants, planner.footprint, chosen, planner.metric, planner.grouping, stats, planner.progress,
        planner.spectra,
    )
    try:
        return Plan.within(replanned, threshold, budget, plan.deltas), note
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
    allocation: str = "distance",
    delta_rank: int | str | None = None,
    recover_steps: int = 0,
    progress: bool = True,
    **shared_settings,
) -> MultiTenantLM:
    """Build one multi-tenant model from N fine-tunes of one MoE model, sharing experts that are
    close. Every supported family (`multimoe.FAMILIES`) takes the same options: distances, merges
    and byte counts follow the family's own expert layout, and dense layers are left alone.

    Args:
        models: `{tenant name: loaded model of a supported family, directory or Hub id}`, at
            least two, all of one family; the result is that family's multi-tenant class.
        similarity: a registered metric: `weight_l2` (the paper's), `weight_cosine`, `output`.
        grouping: `cross_index` (optimal assignment of each tenant's experts to the anchor
            tenant's) or `same_index` (expert i with expert i, the paper's).
        threshold: merge only candidates at most this far apart (`math.inf`: no distance limit).
        memory_budget: bytes, or a multiple of one source model (`"1.25x"`); merges closest-first
            until the model fits, and no further (identical experts are always shared).
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
            Alone, it shares as much as it allows; with a budget, it may stop short of the
            budget, and the report says so.
        max_calibration_rows: the most hidden states kept per tenant and layer, the inputs on which
            `output` similarity and `output_medoid` compare experts.
        allocation: how the budget picks the merges: `"distance"`, the closest candidates first
            (the cheap path), or `"loss"` (needs calibration): the candidates whose merge alone
            raises their tenant's own calibration loss least first, measured for each (layer,
            group, tenant) on a probe of two tenants (see `multimoe.consolidation.allocation` for
            the cost).
        delta_rank: per-tenant low-rank expert deltas (`multimoe.expert_deltas`): each merged expert
            that differs from its entry keeps the truncated SVD of the difference, of this rank (an
            int), or of ranks chosen per expert within `memory_budget` (`"auto"`: the rank steps that
            recover most of the merges' expected harm per byte, merging further where that frees
            bytes that buy more). Their bytes count against the budget. `None` (or 0): no deltas.
        recover_steps: after building, train each tenant's own layers (and deltas) for this many
            steps to match its original's next-token distribution on its calibration data
            (`multimoe.recover`, with its defaults; causal families; needs calibration). The
            report's `loss_after_recovery` holds the result.
        shared_settings: the value of a setting one model applies to every tenant, as in
            `MultiTenantForCausalLM.from_models` (e.g. `router_aux_loss_coef=0.02`).

    With no limit at all, only identical experts are shared (threshold 0): the result is lossless.
    Every numeric option is checked before any tenant is opened, and a budget no sharing can reach
    before any weight is read. The returned model carries `consolidation_report`, whose
    `deciding_limit` names the limit that stopped further sharing, or says that none did.
    """
    check_number("threshold", threshold, optional=True, unbounded=True)  # math.inf: every expert may be shared
    check_number("max_quality_loss", max_quality_loss, optional=True)
    check_number("max_calibration_rows", max_calibration_rows, positive=True, integer=True)
    check_number("recover_steps", recover_steps, integer=True)
    check_settings(shared_settings)
    requested_budget = None if memory_budget is None else MemoryBudget.parse(memory_budget)
    get_metric(similarity), get_grouping(grouping), get_merge(merge)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}.")
    delta_rank = check_delta_rank(delta_rank)
    deltas = None if delta_rank is None else DeltaSettings(delta_rank, merge in KEEPS_A_MEMBER)
    if delta_rank == "auto" and (memory_budget is None or merge not in KEEPS_A_MEMBER):
        raise ValueError(
            f"delta_rank='auto' spends a memory_budget on ranks planned against the member the merge rule keeps; "
            f"it needs memory_budget= and a merge rule that keeps one member ({sorted(KEEPS_A_MEMBER)}), got "
            f"memory_budget={memory_budget!r}, merge={merge!r}. Give an int rank otherwise."
        )
    if not isinstance(models, Mapping) or len(models) < 2:
        raise ValueError("consolidate needs at least two tenants; for one, use MultiTenantForCausalLM.from_models.")
    if anchor not in ANCHOR_RULES and anchor not in models:
        raise ValueError(f"anchor {anchor!r} is neither a tenant ({list(models)}) nor one of {list(ANCHOR_RULES)}.")
    if anchor in ANCHOR_RULES and anchor in models:
        raise ValueError(f"anchor {anchor!r} is ambiguous: it names a rule and a tenant; rename the tenant.")
    needs_data = needs_calibration(similarity, merge, anchor, max_quality_loss, allocation, recover_steps)
    if needs_data and calibration is None:
        raise ValueError(
            f"similarity={similarity!r}, merge={merge!r}, anchor={anchor!r}, max_quality_loss={max_quality_loss!r}, "
            f"allocation={allocation!r}, recover_steps={recover_steps!r} need calibration data."
        )
    tenants = TenantSet.open(models, default_tenant=default_tenant, dtype=dtype, revision=revision, **shared_settings)
    # Read once the family is known (configs only: no weight has been read yet).
    encoder_decoder = tenants.family.is_encoder_decoder
    if recover_steps and encoder_decoder:
        raise ValueError(f"recover_steps trains causal LMs; {tenants.family.model_type} is an encoder-decoder family.")
    data = per_tenant_data(calibration, list(models), tokenizer, encoder_decoder) if calibration is not None else None
    footprint = Footprint.of(tenants)
    budget = None if requested_budget is None else requested_budget.bytes(footprint.one_model)
    if budget is not None and budget < footprint.smallest:
        raise footprint.unreachable(
            budget, "at all: each tenant's own layers plus one model's experts take", footprint.smallest
        )
    if threshold is None and budget is None and max_quality_loss is None:
        threshold = DEFAULT_THRESHOLD
    if deltas is not None and deltas.rank != "auto":  # a rank above an expert's is its full rank
        deltas = replace(deltas, rank=min(deltas.rank, footprint.delta.max_rank))

    stats = collect(tenants, data, max_calibration_rows) if data is not None else None
    first_anchor = tenants.names[0] if anchor in ANCHOR_RULES else anchor
    planner = Planner(tenants, footprint, first_anchor, similarity, grouping, stats, progress, delta_rank == "auto")
    plan = Plan.within(planner, threshold, budget, deltas)

    def build(plan: Plan, merges: int, rule: str = merge) -> MultiTenantLM:
        config, state_dict = assemble(tenants, pool_builder(plan, merges, rule, stats))
        return classes_for(tenants.family)[2].from_assembly(tenants, config, state_dict).eval()

    def losses(model) -> dict[str, float]:
        return {name: language_model_loss(model, data[name], tenant=name) for name in tenants.names}

    def within_guard(after: dict[str, float]) -> bool:
        # LOSS_NOISE: the lossless model's loss may differ from the original's in the last bits.
        return all(after[n] <= stats.losses[n] * (1 + max_quality_loss) + LOSS_NOISE for n in tenants.names)

    notes = []
    if anchor == "most_sensitive":
        plan, note = most_sensitive_plan(plan, losses, build, stats, threshold, budget)
        notes.append(note)
    if allocation == "loss":
        plan.planner.allocate(measured_rises(plan.planner, data, progress))
        plan = Plan.within(plan.planner, threshold, budget, deltas)
        notes.append(
            f"allocation 'loss': {len(plan.planner.candidates)} candidate merges ranked by the rise of their tenant's "
            "calibration loss when merged alone"
        )

    def recovering(model: MultiTenantLM):
        return recover(model, models, calibration=calibration, tokenizer=tokenizer, steps=recover_steps,
                       revision=revision, progress=progress)

    if delta_rank == "auto" and recover_steps:
        plan.planner.tenant_weights, note = recovery_weights(plan, build, recovering)
        plan = Plan.within(plan.planner, threshold, budget, deltas)
        notes.append(note)

    count = plan.count
    model = build(plan, count)
    after = losses(model) if data is not None else None
    deciding = plan.deciding
    if max_quality_loss is not None and not within_guard(after):
        del model  # one result-sized model at a time: each step of the bisection builds its own
        # Bisect the number of merges kept (closest first) for the largest that every tenant accepts.
        low, high = 0, count - 1
        while low < high:
            middle = (low + high + 1) // 2
            if within_guard(losses(build(plan, middle))):
                low = middle
            else:
                high = middle - 1
        count, deciding = low, "max_quality_loss"
        model = build(plan, count)
        after = losses(model)

    built_delta_bytes = model.memory_report().delta_bytes
    reached = footprint.total(count) + built_delta_bytes
    over_budget = None  # a model over budget must not pass unnoticed
    if budget is not None and deciding == "max_quality_loss":
        # The guard undid merges the budget needed (identical ones cost nothing).
        over_budget = f"memory_budget not reached: max_quality_loss={max_quality_loss} stops at"
    elif budget is not None and reached > budget:  # the plan counts every delta it makes: a defect, never silent
        over_budget = "memory_budget exceeded: the model takes"
    if over_budget is not None:
        notes.append(f"{over_budget} {footprint.describe(reached)}, above the budget of {footprint.describe(budget)}.")
        warnings.warn(notes[-1], stacklevel=2)
    layer_reports = []
    for layer_idx, distances in plan.planner.compared_distances.items():
        merged = [c.distance for c in plan.allowed[:count] if c.layer == layer_idx]
        layer_reports.append(
            LayerReport(
                layer=layer_idx,
                pool_size=model.config.pool_sizes[layer_idx],
                merged=len(merged),
                mean_merged_distance=sum(merged) / len(merged) if merged else None,
                max_merged_distance=max(merged) if merged else None,
                distances=distances,
            )
        )
    model.consolidation_report = ConsolidationReport(
        settings=dict(similarity=similarity, grouping=grouping, merge=merge, anchor=anchor, threshold=threshold,
                      memory_budget=memory_budget, max_quality_loss=max_quality_loss, allocation=allocation,
                      delta_rank=delta_rank),
        tenants=list(tenants.names),
        anchor=plan.planner.anchor,
        compared=plan.planner.others[0],
        layers=layer_reports,
        bytes_before=footprint.total(0),
        bytes_after=reached,
        delta_bytes=built_delta_bytes,
        budget_bytes=budget,
        deciding_limit=deciding,
        loss_before=stats.losses if stats is not None else None,
        loss_after=after,
        notes=notes,
    )
    if recover_steps:  # fills the report's loss_after_recovery
        recovering(model)
    return model


__all__ = ["consolidate", "needs_calibration", "parse_budget"]
