"""Exact match through `generate` (greedy, batched, left padding) and held-out perplexity.

Both accept a family's own causal LM or a multi-tenant model (`MultiTenantForCausalLM`) with
`tenant=`; a plain model ignores the tenant, so one merged model is scored with the same call as a multi-tenant one.
`score_tenants` scores every tenant on its own task with any such metric (exact match by default,
`rouge_scores` for the Switch testbed's free-text tasks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..generation import positions_from_mask
from ..modeling import MultiTenantLM
from ..testbed import Example


def _tenant_kwargs(model, tenant: str | None) -> dict:
    if isinstance(model, MultiTenantLM):
        return {"tenant": tenant} if tenant is not None else {}
    return {}


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: Sequence[str], *, tenant: str | None = None, max_new_tokens: int = 8, batch_size: int = 100
) -> list[str]:
    """Greedy continuations of `prompts`, up to the end-of-sequence token, special tokens removed."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        rows = list(prompts[start : start + batch_size])
        batch = tokenizer(rows, return_tensors="pt", padding=True, padding_side="left")  # the caller's tokenizer as is
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **_tenant_kwargs(model, tenant),
        )
        answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def exact_match(model, tokenizer, examples: Sequence[Example], *, tenant: str | None = None, batch_size: int = 100) -> float:
    """Fraction of `examples` whose greedy answer equals the expected one exactly."""
    longest = max(len(tokenizer(e.answer)["input_ids"]) for e in examples) + 1
    answers = generate_answers(
        model, tokenizer, [e.prompt for e in examples], tenant=tenant, max_new_tokens=longest, batch_size=batch_size
    )
    return sum(a == e.answer for a, e in zip(answers, examples)) / len(examples)


@torch.no_grad()
def perplexity(model, tokenizer, examples: Sequence[Example], *, tenant: str | None = None) -> float:
    """exp of the mean next-token loss on the answers (and end token) of `examples`, given the prompts."""
    prompts = [tokenizer(e.prompt)["input_ids"] for e in examples]
    answers = [tokenizer(e.answer)["input_ids"] + [tokenizer.eos_token_id] for e in examples]
    length = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(examples), length), tokenizer.pad_token_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for row, (p, a) in enumerate(zip(prompts, answers)):
        ids[row, length - len(p) - len(a) :] = torch.tensor(p + a)
        mask[row, length - len(p) - len(a) :] = 1
        labels[row, length - len(a) :] = torch.tensor(a)
    positions = positions_from_mask(mask)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **_tenant_kwargs(model, tenant)).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    return math.exp(loss.item())


def score_tenants(
    models: Mapping[str, object] | object,
    tokenizer,
    tasks: Mapping[str, Sequence[Example]],
    *,
    metric: Callable[..., Any] = exact_match,
) -> dict[str, Any]:
    """`metric` of each tenant on its task: `models` is one (multi-tenant or merged) model, or a
    mapping tenant -> model (e.g. the original fine-tunes). `metric(model, tokenizer, examples,
    tenant=...)` is `exact_match` unless given (e.g. `rouge_scores`, whose dict of ROUGE-1/2/L is
    then each tenant's value); a mapping's models get no `tenant`."""
    if isinstance(models, Mapping):
        return {name: metric(models[name], tokenizer, examples) for name, examples in tasks.items()}
    return {name: metric(models, tokenizer, examples, tenant=name) for name, examples in tasks.items()}


__all__ = ["exact_match", "generate_answers", "perplexity", "score_tenants"]
