"""Similarity-based expert consolidation: `consolidate()` and its registries.

    similarity.py   distance metrics (weight_l2, weight_cosine, output), registered by name
    grouping.py     which experts are candidates to share an entry (same_index, cross_index)
    merging.py      how a group becomes one expert (select, keep_anchor, average, ...)
    calibration.py  running the original tenants on calibration data
    streaming.py    a tenant's own model, run one decoder layer at a time (for calibration)
    report.py       ConsolidationReport: markdown and heatmap
    allocation.py   allocation="loss": each candidate merge priced by its tenant's loss rise
    deltas.py       per-tenant low-rank expert deltas: SVD, bytes, ranks within a budget
    recovery.py     recover(): distil each tenant's original into its own layers after merging
    api.py          consolidate(): ranking, budgets, the quality guard, assembly
"""

from .api import consolidate, needs_calibration, parse_budget
from .grouping import GROUPINGS, register_grouping
from .merging import MERGE_RULES, register_merge
from .recovery import RecoveryReport, recover
from .report import ConsolidationReport, LayerReport
from .similarity import SIMILARITY_METRICS, register_metric

__all__ = [
    "ConsolidationReport",
    "GROUPINGS",
    "LayerReport",
    "MERGE_RULES",
    "RecoveryReport",
    "SIMILARITY_METRICS",
    "consolidate",
    "needs_calibration",
    "parse_budget",
    "recover",
    "register_grouping",
    "register_merge",
    "register_metric",
]
