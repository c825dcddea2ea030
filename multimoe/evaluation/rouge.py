"""ROUGE of greedy answers from an encoder-decoder model (a Switch Transformers checkpoint, a merge
of several, or a multi-tenant model with `tenant=`), for tasks whose answers are free text.

Scores come from Google's `rouge-score` package, not `evaluate.load("rouge")`, which fetches its
script from the Hub and so fails offline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rouge_score.rouge_scorer import RougeScorer

from ..testbed import Example

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@torch.no_grad()
def rouge_scores(
    model, tokenizer, examples: Sequence[Example], *, tenant: str | None = None, batch_size: int = 100,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure of the greedy answers to `examples` against their references.

    `max_new_tokens` defaults to the longest reference's token count plus one, so a rambling
    answer is cut where it can only lower precision. `tenant` goes to `generate` only for a
    multi-tenant model; a plain model serves every task alike. The scorer's default tokenizer keeps
    lower-cased runs of [a-z0-9] and drops everything else: right for English words such as the
    Switch testbed's, not for other scripts (those would need RougeScorer's `tokenizer=`).
    """
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(e.answer)["input_ids"]) for e in examples) + 1
    extra = {"tenant": tenant} if tenant is not None and hasattr(model, "set_active_model") else {}
    answers = []
    for start in range(0, len(examples), batch_size):
        batch = tokenizer([e.prompt for e in examples[start : start + batch_size]], return_tensors="pt", padding=True)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **extra)
        answers += tokenizer.batch_decode(output, skip_special_tokens=True)  # the decoder's ids only
    scorer = RougeScorer(list(ROUGE_TYPES))
    scores = [scorer.score(e.answer, answer) for e, answer in zip(examples, answers)]
    return {kind: sum(s[kind].fmeasure for s in scores) / len(scores) for kind in ROUGE_TYPES}


__all__ = ["ROUGE_TYPES", "rouge_scores"]
