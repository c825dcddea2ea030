"""Loss-aware allocation of the memory budget (`consolidate(allocation="loss")`).

The distance between two experts says how far apart their weights or outputs are, not what merging
them costs the tenant: an expert its router rarely picks, or whose output the next layers barely
read, can be far from the anchor's and still merge for free, while a small change to a busy expert
can break a skill. Here each candidate merge (layer, group, tenant) is measured directly: the rise
of that tenant's calibration loss when that one expert of its, and nothing else, reads the anchor's
member of its group instead of its own. The budget is then spent on the cheapest merges first.

Cost: one forward of the tenant's calibration data per candidate, i.e. (tenants - 1) x sparse
layers x experts forwards of one tenant's rows (48 for four 2-layer, 8-expert tenants; 768 for four
32-layer Mixtral-8x7B ones), on a probe model of two tenants (the anchor and the measured one, every
expert of both): at most two models' experts in memory at once.
"""

from __future__ import annotations

from collections.abc import Mapping

from tqdm.auto import tqdm

from ..assembly import TenantSet, assemble_lossless
from ..modeling import classes_for
from .calibration import CalibrationData, language_model_loss

ALLOCATIONS = ("distance", "loss")


def measured_rises(planner, data: Mapping[str, CalibrationData], progress: bool) -> dict[tuple[int, int, str], float]:
    """Each candidate merge's loss rise (nats per scored token) for its tenant, measured alone."""
    tenants, anchor = planner.tenants, planner.anchor
    rises = {}
    bar = tqdm(total=len(planner.candidates), desc="loss of each merge", disable=not progress)
    for name in planner.others:
        pair = TenantSet(
            {anchor: tenants.checkpoints[anchor], name: tenants.checkpoints[name]}, anchor, tenants.dtype,
            tenants.settings,
        )
        config, state_dict = assemble_lossless(pair)
        probe = classes_for(tenants.family)[2].from_assembly(pair, config, state_dict).eval()
        baseline = language_model_loss(probe, data[name], tenant=name)
        for layer_idx, groups in enumerate(planner.groups):
            if not groups:
                continue
            layer = probe.model.layers[layer_idx]
            own = layer.tenants[name].get_submodule(layer.experts_path).expert_map
            anchor_map = config.expert_map(anchor, layer_idx)
            for group_idx, group in enumerate(groups):
                expert = group.members[name]
                kept = int(own[expert])
                own[expert] = anchor_map[group.members[anchor]]
                rises[layer_idx, group_idx, name] = language_model_loss(probe, data[name], tenant=name) - baseline
                own[expert] = kept
                bar.update()
        del probe, state_dict
    bar.close()
    return rises


__all__ = ["ALLOCATIONS", "measured_rises"]
