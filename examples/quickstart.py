"""multimoe quickstart: three Mixtral fine-tunes served from one shared expert pool.

Builds three tiny Mixtral "fine-tunes" on the fly (no download), merges them losslessly into one
`MultiTenantMixtralForCausalLM`, prints what the shared pool saves, switches tenants, generates
through `generate()` and `pipeline("text-generation")`, and checks every answer against the
original model. Then it saves, reloads through `AutoModelForCausalLM` and checks again.

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, pipeline

import multimoe  # noqa: F401  (registers the Auto classes)
from multimoe import MultiTenantMixtralForCausalLM
from multimoe.testing import character_tokenizer, fine_tune, random_mixtral, tiny_mixtral_config


def main() -> None:
    tokenizer = character_tokenizer()
    base = random_mixtral(tiny_mixtral_config(num_hidden_layers=4, num_local_experts=8), seed=0)
    originals = {
        "base": base,
        "chat": fine_tune(base, seed=1, changed_experts={0, 1, 2}),
        "math": fine_tune(base, seed=2, changed_experts={5, 6, 7}),
    }

    model = MultiTenantMixtralForCausalLM.from_models(originals).eval()
    print("tenants:", model.tenants, "| pool size per layer:", model.config.pool_sizes)
    print(model.memory_report().to_markdown(), "\n")

    prompt = "what is 2+2?"
    inputs = tokenizer(prompt, return_tensors="pt")
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    for name, original in originals.items():
        start = time.perf_counter_ns()
        model.set_active_model(name)
        switch_us = (time.perf_counter_ns() - start) / 1000
        ours = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        theirs = original.generate(**inputs, max_new_tokens=16, do_sample=False)
        answer = generator(prompt, max_new_tokens=16, do_sample=False)[0]["generated_text"]
        same = "identical to" if torch.equal(ours, theirs) else "DIFFERENT from"
        print(f"[{name}] switch {switch_us:.1f} us | pipeline: {answer!r} | generate() {same} the original")

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory, max_shard_size="200KB")
        reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            for name in reloaded.tenants:
                exact = torch.equal(reloaded(**inputs, tenant=name).logits, model(**inputs, tenant=name).logits)
                print(f"reloaded {type(reloaded).__name__}[{name}]: logits bit-identical = {exact}")


if __name__ == "__main__":
    main()
