"""What a consolidation did: per sparse layer pools and distances, bytes, per-tenant quality, the limit.

Dense layers (a family's MLP-only layers) hold no experts, so they have no pool and no entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class LayerReport:
    layer: int  # the decoder layer's index
    pool_size: int
    merged: int  # local experts that joined another tenant's entry
    mean_merged_distance: float | None
    max_merged_distance: float | None
    distances: torch.Tensor  # [E, E]: the compared tenant's experts (rows) vs the anchor's (columns)


@dataclass
class ConsolidationReport:
    settings: dict
    tenants: list[str]
    anchor: str  # the tenant groups are built around
    compared: str  # the tenant whose distances to the anchor `layers` hold
    layers: list[LayerReport]  # the sparse layers, in order
    bytes_before: int  # the N source models
    bytes_after: int  # the consolidated model
    deciding_limit: str  # the limit that stopped further sharing, or "none (...)" with the reason
    budget_bytes: int | None = None  # below bytes_after only when max_quality_loss stopped short of it
    loss_before: dict[str, float] | None = None
    loss_after: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    delta_bytes: int = 0  # of bytes_after: the tenants' low-rank expert deltas
    loss_after_recovery: dict[str, float] | None = None  # `recover_steps` / `multimoe.recover`

    @property
    def relative_loss_increase(self) -> dict[str, float] | None:
        if self.loss_before is None or self.loss_after is None:
            return None
        return {name: self.loss_after[name] / self.loss_before[name] - 1 for name in self.tenants}

    def to_markdown(self) -> str:
        mib = 2**20
        settings = ", ".join(f"{key}={value}" for key, value in self.settings.items())
        deltas = f", of which {self.delta_bytes / mib:.2f} MiB low-rank expert deltas" if self.delta_bytes else ""
        lines = [
            f"**Consolidation** of {len(self.tenants)} tenants ({settings})",
            "",
            f"Memory: {self.bytes_before / mib:.2f} MiB in the sources -> {self.bytes_after / mib:.2f} MiB{deltas} "
            f"({1 - self.bytes_after / self.bytes_before:.1%} saved). Deciding limit: **{self.deciding_limit}**. "
            f"Groups are built around the experts of {self.anchor!r}.",
            "",
            "| layer | pool size | merged experts | mean merged distance | max merged distance |",
            "|---:|---:|---:|---:|---:|",
        ]
        for layer in self.layers:
            mean = "-" if layer.mean_merged_distance is None else f"{layer.mean_merged_distance:.4g}"
            largest = "-" if layer.max_merged_distance is None else f"{layer.max_merged_distance:.4g}"
            lines.append(f"| {layer.layer} | {layer.pool_size} | {layer.merged} | {mean} | {largest} |")
        increase = self.relative_loss_increase
        if increase is not None:
            recovered = self.loss_after_recovery or {}
            header = "| tenant | calibration loss before | after merging | relative change |"
            rule = "|---|---:|---:|---:|"
            if recovered:
                header, rule = header + " after recovery |", rule + "---:|"
            lines += ["", header, rule]
            for name in self.tenants:
                row = f"| {name} | {self.loss_before[name]:.4f} | {self.loss_after[name]:.4f} | {increase[name]:+.2%} |"
                if recovered:
                    row += f" {recovered[name]:.4f} |" if name in recovered else " - |"
                lines.append(row)
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)

    def heatmap(self, path: str | Path) -> Path:
        """A PNG with one panel per sparse layer: distance of the compared tenant's experts to the anchor's."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        count = len(self.layers)
        figure, axes = plt.subplots(1, count, figsize=(3.2 * count, 3), squeeze=False)
        for axis, layer in zip(axes[0], self.layers):
            image = axis.imshow(layer.distances.numpy(), cmap="viridis")
            axis.set_title(f"layer {layer.layer}")
            axis.set_xlabel(f"{self.anchor} expert")
            axis.set_ylabel(f"{self.compared} expert")
            figure.colorbar(image, ax=axis, fraction=0.046)
        figure.suptitle(f"expert distance ({self.settings.get('similarity')})")
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path


__all__ = ["ConsolidationReport", "LayerReport"]
