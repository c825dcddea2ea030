"""`multimoe demo`: a shipped testbed's four task fine-tunes served from one consolidated model.

Loads the tenants, consolidates them with multimoe's best settings under a memory budget, prints
the memory saved, each tenant's answer to a sample prompt, and each tenant's score before and after
on held-out prompts. `--family mixtral` (the default) runs the Mixtral testbed, answering through
`pipeline("text-generation")` and scored by exact match; `--family switch` runs the Switch
Transformers seq2seq testbed, answering through `generate` (transformers v5 has no text2text
pipeline) and scored by ROUGE-1. Offline, under a minute on 2 CPUs.
"""

from __future__ import annotations

import time

from transformers import pipeline

from .evaluation.presets import consolidate_preset
from .evaluation.testbeds import TESTBEDS

DEFAULT_BUDGET = "1.25x"
DEFAULT_EXAMPLES = 50
FAMILIES = {"mixtral": "mixtral", "switch": "switch", "switch_transformers": "switch"}  # --family spellings


def answer(model, tokenizer, prompt: str, tenant: str) -> str:
    """The tenant's greedy answer to one prompt, as a user would ask for it."""
    if model.config.is_encoder_decoder:
        output = model.generate(**tokenizer(prompt, return_tensors="pt"), tenant=tenant, max_new_tokens=32)
        return tokenizer.decode(output[0], skip_special_tokens=True)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    with model.active(tenant):
        return generator(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]


def main(
    memory_budget: str = DEFAULT_BUDGET, examples: int = DEFAULT_EXAMPLES, family: str = "mixtral"
) -> dict[str, tuple[float, float]]:
    """Run the demo, print as it goes; returns {tenant: (score before, score after)}."""
    start = time.time()
    testbed = TESTBEDS[FAMILIES[family]]
    tokenizer = testbed.tokenizer()
    originals = {name: testbed.load(name) for name in testbed.tasks}
    model = consolidate_preset(originals, "multimoe", memory_budget, tokenizer, registry=testbed.tasks)
    report = model.memory_report()
    print(f"Consolidated {len(originals)} {testbed.family} tenants ({', '.join(originals)}) at memory budget "
          f"{memory_budget} of one model:\n")
    print(report.to_markdown())
    print(f"\nmemory saved: {report.saving:.1%} ({report.source_models_bytes / 2**20:.2f} MiB -> {report.total_bytes / 2**20:.2f} MiB)\n")

    print("Sample prompts (greedy):")
    for name, task in testbed.tasks.items():
        sample = task.held_out(1)[0]
        print(f"  {name:8s} {sample.prompt!r} -> {answer(model, tokenizer, sample.prompt, name)!r} "
              f"(expected {sample.answer!r})")

    metric, label = testbed.metrics[0], testbed.metric_labels[0]
    scores = {}
    for name, task in testbed.tasks.items():
        held_out = task.held_out(examples)
        before = testbed.score(originals[name], tokenizer, held_out)[metric]
        scores[name] = (before, testbed.score(model, tokenizer, held_out, tenant=name)[metric])
    print(f"\n{label} on {examples} held-out prompts per task:\n")
    print("| tenant | original | consolidated |\n|---|---:|---:|")
    for name, (before, after) in scores.items():
        print(f"| {name} | {before:.0%} | {after:.0%} |")
    print(f"\ndone in {time.time() - start:.1f} s")
    return scores
