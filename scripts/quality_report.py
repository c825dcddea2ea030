"""Reproduce the paper's scalability table at small scale on the shipped testbed: each tenant's
exact match when 2, 3 or 4 fine-tunes share one model, for multimoe (best settings), the paper's
preset, the no-reconfiguration ablation and the model-merging baselines. Writes docs/quality.md
and docs/img/quality_memory.png.

    python scripts/quality_report.py
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging  # noqa: E402

from multimoe import testbed  # noqa: E402
from multimoe.evaluation import BASELINES, exact_match, no_reconfiguration, score_tenants  # noqa: E402
from multimoe.evaluation.presets import PRESETS, consolidate_preset  # noqa: E402
from multimoe.memory import parameter_bytes  # noqa: E402

BUDGETS = ("1.0x", "1.25x", "1.5x", "2.0x")
ABLATION_BUDGET = "1.25x"
GOAL_TENANTS, GOAL_BUDGET, GOAL_KEEP = 4, "1.25x", 0.97
COMMAND = "python scripts/quality_report.py"
ROOT = Path(__file__).resolve().parents[1]


def run(tenant_counts: list[int]) -> dict:
    """{N: {"columns": {label: {tenant: accuracy | None}}, "memory": {label: x one model}}}."""
    tokenizer = testbed.tokenizer()
    base = testbed.load(testbed.BASE)
    one_model = parameter_bytes([base])
    originals = {name: testbed.load(name) for name in testbed.TASKS}
    held_out = {name: task.held_out() for name, task in testbed.TASKS.items()}
    original_scores = {name: exact_match(model, tokenizer, held_out[name]) for name, model in originals.items()}
    results = {}
    for count in tenant_counts:
        names = list(testbed.TASKS)[:count]
        models, tasks = {n: originals[n] for n in names}, {n: held_out[n] for n in names}
        columns = {"original": {n: original_scores[n] for n in names}}
        memory = {"original": float(count)}
        for preset in PRESETS:
            for budget in BUDGETS:
                label = f"{preset} {budget}"
                try:
                    model = consolidate_preset(models, preset, budget, tokenizer)
                except ValueError:  # below N tenants' own layers plus one model's experts
                    columns[label] = {n: None for n in names}
                    continue
                columns[label] = score_tenants(model, tokenizer, tasks)
                memory[label] = model.memory_report().total_bytes / one_model
                if preset == "paper" and budget == ABLATION_BUDGET:
                    ablation = no_reconfiguration(model)
                    label = f"no reconfiguration {budget}"
                    columns[label] = score_tenants(ablation, tokenizer, tasks)
                    report = ablation.memory_report()
                    memory[label] = (report.pool_bytes + report.tenant_bytes[names[0]]) / one_model
            print(f"N={count} {preset} done", flush=True)
        for name, baseline in BASELINES.items():
            columns[name] = score_tenants(baseline(base, models), tokenizer, tasks)
            memory[name] = 1.0
        results[count] = {"columns": columns, "memory": memory}
        print(f"N={count} done", flush=True)
    return results


def cell(value: float | None, count: int) -> str:
    return f"n/a (budget below {count} tenants' own layers)" if value is None else f"{value:.1%}"


def goal(results: dict, orders: dict) -> tuple[bool, str]:
    """The headline claim, checked cell by cell. "Beat" is strict, except that a tie at the
    original fine-tune's own accuracy counts as holding: no method can do better than keep it."""
    if GOAL_TENANTS not in results:
        return False, "not measured (4 tenants not run)"
    columns = results[GOAL_TENANTS]["columns"]
    ours, original = columns[f"multimoe {GOAL_BUDGET}"], columns["original"]
    if any(v is None for v in ours.values()):
        return False, f"multimoe at {GOAL_BUDGET} is infeasible"
    kept = {n: ours[n] / original[n] for n in ours}
    rivals = [label for label in columns if label != "original" and not label.startswith("multimoe")]
    cells = [(label, n, columns[label][n]) for label in rivals for n in ours if columns[label][n] is not None]
    losses = [f"{label} on {n} ({value:.1%} vs {ours[n]:.1%})" for label, n, value in cells if value > ours[n]]
    at_ceiling = sum(value == ours[n] >= original[n] for _, n, value in cells)
    below = [f"{label} on {n} ({value:.1%})" for label, n, value in cells if value == ours[n] < original[n]]
    keeps = all(k >= GOAL_KEEP for k in kept.values())
    worst = {preset: {n: min(r[n] for r in rotations.values()) for n in ours} for preset, rotations in orders.items()}
    order_losses = [n for n in ours if worst["paper"][n] > worst["multimoe"][n]]
    by_order = {
        first: [n for n in ours if orders["multimoe"][first][n] > paper[n]] for first, paper in orders["paper"].items()
    }
    worse_orders = [first for first, paper in orders["paper"].items() if any(paper[n] > orders["multimoe"][first][n] for n in ours)]
    lines = [
        f"- kept accuracy at {GOAL_BUDGET} (multimoe / original): "
        + ", ".join(f"{n} {k:.1%}" for n, k in kept.items())
        + (f": every tenant keeps >= {GOAL_KEEP:.0%}." if keeps else f": NOT every tenant keeps >= {GOAL_KEEP:.0%}."),
        f"- of {len(cells)} (method, tenant) cells of the other methods, multimoe at {GOAL_BUDGET} is strictly better "
        f"in {len(cells) - len(losses) - at_ceiling - len(below)}, tied at the original fine-tune's accuracy in "
        f"{at_ceiling}, tied below it in {len(below)}" + (": " + "; ".join(below) if below else "")
        + f", worse in {len(losses)}" + (": " + "; ".join(losses) + "." if losses else "."),
        "- worst case over every rotation of the tenant order (below), per tenant: "
        + ", ".join(f"{n} multimoe {worst['multimoe'][n]:.1%} / paper {worst['paper'][n]:.1%}" for n in ours)
        + (f"; the paper's preset is better on {', '.join(order_losses)}." if order_losses else "."),
        "- order by order against the paper's preset: "
        + "; ".join(f"{first} first: " + (f"better on {', '.join(names)}" if names else "tied on every tenant")
                    for first, names in by_order.items())
        + (f"; worse on some tenant with {', '.join(worse_orders)} first." if worse_orders else "; never worse."),
    ]
    met = keeps and not losses and not below and not order_losses and not worse_orders
    return met, "\n".join(lines)


def order_sensitivity(count: int = GOAL_TENANTS, budget: str = GOAL_BUDGET) -> dict[str, dict[str, dict[str, float]]]:
    """{preset: {first tenant: {tenant: accuracy}}} for every rotation of the tenant order: the paper's
    groups are built around the first tenant, whose member `select` keeps."""
    tokenizer = testbed.tokenizer()
    names = list(testbed.TASKS)[:count]
    models = {n: testbed.load(n) for n in names}
    tasks = {n: testbed.TASKS[n].held_out() for n in names}
    out = {}
    for preset in PRESETS:
        out[preset] = {}
        for shift in range(count):
            order = names[shift:] + names[:shift]
            model = consolidate_preset({n: models[n] for n in order}, preset, budget, tokenizer)
            out[preset][order[0]] = score_tenants(model, tokenizer, tasks)
    return out


def write(results: dict, orders: dict, seconds: float, plot: Path, out: Path) -> None:
    met, detail = goal(results, orders)
    text = [
        "# Quality at small scale: the paper's scalability table",
        "",
        f"Produced by `{COMMAND}` ({seconds / 60:.1f} min with {torch.get_num_threads()} torch threads on "
        f"{os.cpu_count()} CPU cores, nothing else running: a second busy process makes it many times slower), on",
        "the testbed shipped in `multimoe/testbed/` (made by `python scripts/make_testbed.py`).",
        "",
        f"**Goal**: with {GOAL_TENANTS} tenants at {GOAL_BUDGET} one model's memory, every tenant keeps >= "
        f"{GOAL_KEEP:.0%} of its original accuracy, and multimoe's best settings beat the paper's preset and every "
        f"merging baseline on every tenant. **{'Met' if met else 'Not met'}.** (\"Beat\" is read strictly, except "
        "that a tie at the original fine-tune's own accuracy counts as holding, since no method can do better than "
        "keep it; the paper's preset is also compared over every tenant order, since its result depends on which "
        "tenant is listed first.)",
        "",
        detail,
        "",
        "Cells are exact match on 200 held-out prompts of the tenant's task (greedy decoding through `generate`).",
        "Columns: `original` is each full fine-tune alone; `multimoe X` is `consolidate` with "
        f"`{PRESETS['multimoe']}` and each tenant calibrated on 64 prompt/completion pairs of its own task's training "
        "distribution (loss on the completion only), at memory budget X of one "
        f"model; `paper X` is the paper's algorithm `{PRESETS['paper']}`; `no reconfiguration` is the paper's "
        f"ablation (the paper preset's pool at {ABLATION_BUDGET}, one shared set of non-expert layers, the tenants' "
        "mean); the rest merge all tenants into ONE Mixtral (uniform average, task arithmetic, TIES, DARE; "
        "`peft.utils.merge_utils`). A budget below N tenants' own layers plus one model's experts cannot be met.",
        "",
        f"![mean accuracy against memory]({plot.relative_to(out.parent).as_posix()})",
        "",
    ]
    for count, result in results.items():
        columns, memory = result["columns"], result["memory"]
        labels = list(columns)
        text += [f"## {count} tenants", "", "| tenant | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for tenant in columns["original"]:
            text.append(f"| {tenant} | " + " | ".join(cell(columns[label][tenant], count) for label in labels) + " |")
        means = [
            "n/a" if None in columns[label].values() else f"{sum(columns[label].values()) / count:.1%}" for label in labels
        ]
        text.append("| **mean** | " + " | ".join(means) + " |")
        text.append("| memory (x one model) | " + " | ".join(f"{memory[label]:.2f}" if label in memory else "-" for label in labels) + " |")
        text.append("")
    names = list(next(iter(orders.values())).values())[0]
    text += [
        f"## Sensitivity to the tenant order ({GOAL_TENANTS} tenants, {GOAL_BUDGET})",
        "",
        "The paper's groups are built around the first tenant, and its `select` keeps that tenant's expert, so the",
        "paper preset favours whichever tenant is listed first. multimoe builds its groups around the tenant its",
        "probe finds most sensitive (`anchor=\"most_sensitive\"`), whatever the order. Each row lists the tenants",
        "starting from `first` (a rotation of the order above).",
        "",
        "| method | first | " + " | ".join(names) + " | mean |",
        "|---|---|" + "---:|" * (len(names) + 1),
    ]
    for preset, rotations in orders.items():
        for first, scores in rotations.items():
            values = [scores[n] for n in names]
            text.append(f"| {preset} | {first} | " + " | ".join(f"{v:.1%}" for v in values) + f" | {sum(values) / len(values):.1%} |")
    for preset, rotations in orders.items():
        worst = {n: min(r[n] for r in rotations.values()) for n in names}
        text.append(f"\n{preset}: worst case over orders per tenant: " + ", ".join(f"{n} {v:.1%}" for n, v in worst.items()) + ".")
    out.write_text("\n".join(text) + "\n")


def draw(results: dict, path: Path) -> None:
    """Mean accuracy against memory, one panel per tenant count; presets as lines over budgets."""
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True, squeeze=False)
    for axis, (count, result) in zip(axes[0], results.items()):
        columns, memory = result["columns"], result["memory"]
        colors = iter(plt.cm.tab10.colors)  # one colour per method, the same in every panel
        for preset in PRESETS:
            points = sorted(
                (memory[label], sum(columns[label].values()) / count)
                for label in columns
                if label.startswith(preset + " ") and label in memory
            )
            if points:
                axis.plot(*zip(*points), marker="o", label=preset, color=next(colors))
        for label in columns:
            if not label.startswith(tuple(p + " " for p in PRESETS)) and label in memory:
                mean = sum(columns[label].values()) / count
                axis.scatter(memory[label], mean, label=label, marker="x" if memory[label] == 1.0 else "s", color=next(colors))
        axis.set_title(f"{count} tenants")
        axis.set_xlabel("memory (x one model)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean exact match")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the whole first paragraph
    parser.add_argument("--tenants", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "quality_memory.png")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    logging.disable_progress_bar()
    start = time.time()
    results = run(args.tenants)
    orders = order_sensitivity()
    draw(results, args.plot)
    write(results, orders, time.time() - start, args.plot, args.out)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
