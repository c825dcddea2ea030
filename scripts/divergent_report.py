"""The divergent testbed's quality report, docs/quality-divergent.md: four fine-tunes whose experts moved 45-88%
from their base, consolidated at 1.25x, 1.5x and 2.0x one model with the recommended preset, with
each tool of issue 16 added alone (loss-aware allocation, low-rank deltas, distillation recovery),
deltas with recovery (the DIVERGENT preset) and all three, against the paper's preset and the
merging baselines; plus the gentle testbed with the DIVERGENT settings, in every tenant order (the
check that they may be recommended).

    python scripts/divergent_report.py                  # writes docs/quality-divergent.md
    python scripts/divergent_report.py --held-out 50    # quicker, for a look
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers.utils import logging

from multimoe.consolidation import consolidate, needs_calibration
from multimoe.evaluation import BASELINES, score_tenants
from multimoe.evaluation.presets import BEST, DIVERGENT, PAPER, calibration_pairs
from multimoe.evaluation.testbeds import TESTBEDS
from multimoe.memory import parameter_bytes

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "quality-divergent.md"
BUDGETS = ("1.25x", "1.5x", "2.0x")
TOOLS = {  # added to the recommended preset, BEST
    "preset": {},
    "+ loss allocation": dict(allocation="loss"),
    "+ deltas": dict(delta_rank="auto"),
    "+ recovery": dict(recover_steps=200),
    "+ deltas + recovery (DIVERGENT)": {key: DIVERGENT[key] for key in ("delta_rank", "recover_steps")},
    "all together": dict(allocation="loss", delta_rank="auto", recover_steps=200),
}
GOALS = {"1.25x": 0.90, "1.5x": 0.97}  # every tenant keeps this share of its own accuracy, at most this budget
GENTLE_KEEP = 0.97


def consolidated(models: dict, testbed, budget: str, settings: dict, tokenizer):
    """`consolidate` with `settings`, each tenant calibrated on its own task where they need data (the
    paper's preset does not: its `select` would otherwise keep the most used member)."""
    needs_data = needs_calibration(
        settings["similarity"], settings["merge"], settings.get("anchor", "first"), None,
        settings.get("allocation", "distance"), settings.get("recover_steps", 0),
    )
    calibration = {name: calibration_pairs([name], registry=testbed.tasks) for name in models} if needs_data else None
    return consolidate(dict(models), **settings, memory_budget=budget, calibration=calibration,
                       tokenizer=tokenizer if needs_data else None, progress=False)


def divergent(held_out_count: int) -> tuple[list[str], dict]:
    testbed = TESTBEDS["divergent"]
    tokenizer, base = testbed.tokenizer(), testbed.load(testbed.base)
    one_model = parameter_bytes([base])
    models = {name: testbed.load(name) for name in testbed.tasks}
    held_out = {name: task.held_out(held_out_count) for name, task in testbed.tasks.items()}
    original = {n: s["exact_match"] for n, s in score_tenants(models, tokenizer, held_out, metric=testbed.score).items()}
    rows, kept = [], {}
    columns = [(f"multimoe {tool}", dict(BEST, **extra)) for tool, extra in TOOLS.items()] + [("paper", PAPER)]
    for budget in BUDGETS:
        for label, settings in columns:
            start = time.perf_counter()
            model = consolidated(models, testbed, budget, settings, tokenizer)
            seconds = time.perf_counter() - start
            scores = score_tenants(model, tokenizer, held_out)
            kept[budget, label] = {n: scores[n] / original[n] for n in models}
            memory = model.memory_report().total_bytes / one_model
            rows.append((budget, label, scores, memory, seconds))
            print(f"{budget} {label}: {kept[budget, label]} ({seconds:.0f} s)", flush=True)
    for name, baseline in BASELINES.items():
        scores = score_tenants(baseline(base, models), tokenizer, held_out)
        rows.append(("1.0x", name, scores, 1.0, None))
    names = list(models)
    lines = [
        "| budget | method | " + " | ".join(names) + " | mean | memory (x one model) | seconds |",
        "|---|---|" + "---:|" * (len(names) + 3),
        "| - | original | " + " | ".join(f"{original[n]:.1%}" for n in names)
        + f" | {sum(original.values()) / len(names):.1%} | {len(names):.2f} | - |",
    ]
    for budget, label, scores, memory, seconds in rows:
        cells = " | ".join(f"{scores[n]:.1%} ({scores[n] / original[n]:.0%})" for n in names)
        took = "-" if seconds is None else f"{seconds:.0f}"
        lines.append(f"| {budget} | {label} | {cells} | {sum(scores.values()) / len(names):.1%} | {memory:.2f} | {took} |")
    return lines, kept


def gentle_orders(held_out_count: int) -> tuple[list[str], bool]:
    """The gentle testbed at 1.25x with the DIVERGENT settings, in every rotation of the tenant order."""
    testbed = TESTBEDS["mixtral"]
    tokenizer = testbed.tokenizer()
    names = list(testbed.tasks)
    models = {name: testbed.load(name) for name in names}
    held_out = {name: task.held_out(held_out_count) for name, task in testbed.tasks.items()}
    original = score_tenants(models, tokenizer, held_out)
    settings = DIVERGENT
    lines = ["| first | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    holds = True
    for shift in range(len(names)):
        order = names[shift:] + names[:shift]
        model = consolidated({n: models[n] for n in order}, testbed, "1.25x", settings, tokenizer)
        scores = score_tenants(model, tokenizer, held_out)
        holds &= all(scores[n] >= GENTLE_KEEP * original[n] for n in names)
        lines.append(f"| {order[0]} | " + " | ".join(f"{scores[n]:.1%} ({scores[n] / original[n]:.0%})" for n in names) + " |")
    return lines, holds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held-out", type=int, default=200, help="held-out prompts per task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    start = time.perf_counter()
    table, kept = divergent(args.held_out)
    gentle, holds = gentle_orders(args.held_out)
    minutes = (time.perf_counter() - start) / 60
    goals = []
    for budget, share in GOALS.items():
        best = {label: min(values.values()) for (b, label), values in kept.items() if b == budget}
        winner = max(best, key=best.get)
        goals.append(
            f"- at {budget}: every tenant >= {share:.0%} of its own accuracy: "
            + ("**met**" if best[winner] >= share else "**not met**")
            + f" (best: {winner}, its weakest tenant keeps {best[winner]:.0%})."
        )
    body = "\n".join([
        f"Produced by `python scripts/divergent_report.py` ({minutes:.1f} min with {args.threads} torch threads), on "
        "the divergent testbed shipped in `multimoe/testbed/divergent/` (made by `python "
        "scripts/make_divergent_testbed.py`): four full fine-tunes of the gentle testbed's base that learned skills "
        "the base lacks (duplicate, subtract, caesar, maximum: the base scores 0%) with large steps (lr 5e-3, 1000 "
        "steps), so that their experts moved 45-88% from the base (the gentle fine-tunes' moved 6-15%).",
        "",
        f"Cells are exact match on {args.held_out} held-out prompts (in brackets: the share of the tenant's own "
        f"fine-tune's). `multimoe preset` is `{BEST}`, each tenant calibrated on 64 pairs of its own task; each "
        "tool is added alone, then deltas with recovery (the recommended settings for such fine-tunes, "
        f"`multimoe.evaluation.presets.DIVERGENT`), then all three (`{TOOLS['all together']}`). "
        f"`paper` is `{PAPER}`. The "
        "merging baselines merge all four into one model. Seconds: the whole `consolidate` call, recovery included.",
        "",
        "**Goals**:",
        *goals,
        "",
        *table,
        "",
        "**The gentle testbed with the DIVERGENT settings** (4 tenants, 1.25x, every rotation of the tenant order): every "
        f"tenant >= {GENTLE_KEEP:.0%} of its own accuracy in every order: **{'met' if holds else 'not met'}**.",
        "",
        *gentle,
    ])
    args.out.write_text("# Quality when fine-tunes diverged: allocation, deltas, recovery\n\n" + body + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
