"""`multimoe demo`: the shipped testbed's four task fine-tunes served from one consolidated model.

Loads the tenants, consolidates them with multimoe's best settings under a memory budget, prints
the memory saved, each tenant's answer to a sample prompt through `pipeline("text-generation")`,
and exact match per tenant before and after on held-out prompts. Offline, under a minute on 2 CPUs.
"""

from __future__ import annotations

import time

from transformers import pipeline

from . import testbed
from .evaluation import exact_match
from .evaluation.presets import consolidate_preset

DEFAULT_BUDGET = "1.25x"
DEFAULT_EXAMPLES = 50


def main(memory_budget: str = DEFAULT_BUDGET, examples: int = DEFAULT_EXAMPLES) -> dict[str, tuple[float, float]]:
    """Run the demo, print as it goes; returns {tenant: (accuracy before, accuracy after)}."""
    start = time.time()
    tokenizer = testbed.tokenizer()
    originals = {name: testbed.load(name) for name in testbed.TASKS}
    model = consolidate_preset(originals, "multimoe", memory_budget, tokenizer)
    report = model.memory_report()
    print(f"Consolidated {len(originals)} tenants ({', '.join(originals)}) at memory budget {memory_budget} of one model:\n")
    print(report.to_markdown())
    print(f"\nmemory saved: {report.saving:.1%} ({report.source_models_bytes / 2**20:.2f} MiB -> {report.total_bytes / 2**20:.2f} MiB)\n")

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    print("Sample prompts (pipeline('text-generation'), greedy):")
    for name, task in testbed.TASKS.items():
        sample = task.held_out(1)[0]
        with model.active(name):
            answer = generator(sample.prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
        print(f"  {name:8s} {sample.prompt!r:16s} -> {answer!r} (expected {sample.answer!r})")

    scores = {}
    for name, task in testbed.TASKS.items():
        held_out = task.held_out(examples)
        scores[name] = (exact_match(originals[name], tokenizer, held_out), exact_match(model, tokenizer, held_out, tenant=name))
    print(f"\nExact match on {examples} held-out prompts per task:\n")
    print("| tenant | original | consolidated |\n|---|---:|---:|")
    for name, (before, after) in scores.items():
        print(f"| {name} | {before:.0%} | {after:.0%} |")
    print(f"\ndone in {time.time() - start:.1f} s")
    return scores
