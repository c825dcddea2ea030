"""A second shipped Mixtral testbed, "divergent": four FULL fine-tunes of the shipped base
(`multimoe/testbed/base`, reused as is) that each learn a skill the base lacks, in large steps, so
that their experts move far from the base's (made by `scripts/make_divergent_testbed.py`).

Why it exists: the gentle testbed's fine-tunes move their experts little (6-15%), so sharing
them costs little. Here every tenant's experts moved >= 30% from the base (45-88%: the relative
Frobenius distance ||W_tuned - W_base|| / ||W_base|| of each layer's stacked `gate_up_proj` and
`down_proj`, averaged per tenant; `expert_divergence`), and 70-92% from one another's: consolidation
loses accuracy here unless it spends its memory wisely, on the experts each tenant needs.

The four exact-match tasks use only the shipped character tokenizer's characters, and their
prompts (ending in "=") start with words none of the gentle tasks use:

- `duplicate`: "dup abc=" -> "abcabc" (a word of 3-5 letters a-l, twice);
- `subtract`: "sub 73 28=" -> "45" (two 2-digit numbers, the first not smaller);
- `caesar`: "rot abc=" -> "cde" (each letter two further on: a Caesar shift by 2);
- `maximum`: "max 38274=" -> "8" (the largest of 4-7 digits).

Each fine-tune trains every weight (experts included) for 1000 steps of AdamW at lr 5e-3 (the
gentle fine-tunes: 300 steps at 5e-4), and is shipped in bfloat16 (`load` upcasts it to float32
exactly), 1.6 MB each. The build script checks and prints (exact match on 200 held-out prompts, of
the shipped bfloat16 weights; the relative movement of each layer's expert tensors):

| task | base | fine-tune | layer 0 gate_up_proj | layer 0 down_proj | layer 1 gate_up_proj | layer 1 down_proj | mean |
|---|---:|---:|---:|---:|---:|---:|---:|
| duplicate | 0.000 | 1.000 | 0.649 | 0.656 | 0.909 | 0.842 | 0.764 |
| subtract | 0.000 | 1.000 | 0.805 | 0.814 | 0.973 | 0.927 | 0.880 |
| caesar | 0.000 | 1.000 | 0.759 | 0.749 | 0.813 | 0.759 | 0.770 |
| maximum | 0.000 | 0.990 | 0.324 | 0.355 | 0.544 | 0.580 | 0.451 |

Checks: the base scores < 10% on every task, every fine-tune >= 90%, and every tenant's experts
moved >= 30% on average.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import torch
from transformers import MixtralForCausalLM, PreTrainedTokenizerFast

from .. import BASE
from .. import Example, Task
from .. import checkpoint as gentle_checkpoint
from .. import tokenizer as gentle_tokenizer

ROOT = Path(__file__).parent
EXPERT_TENSORS = ("gate_up_proj", "down_proj")


def _letters(rng: random.Random, low: int = 3, high: int = 5) -> str:
    return "".join(rng.choice(string.ascii_lowercase[:12]) for _ in range(rng.randint(low, high)))


def _duplicate(rng: random.Random) -> Example:
    word = _letters(rng)
    return Example(f"dup {word}=", word + word)


def _subtract(rng: random.Random) -> Example:
    a = rng.randint(10, 99)
    b = rng.randint(10, a)
    return Example(f"sub {a} {b}=", str(a - b))


def _caesar(rng: random.Random) -> Example:
    word = _letters(rng)
    return Example(f"rot {word}=", "".join(chr(ord(c) + 2) for c in word))


def _maximum(rng: random.Random) -> Example:
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(4, 7)))
    return Example(f"max {digits}=", max(digits))


TASKS: dict[str, Task] = {
    name: Task(name, make)
    for name, make in [("duplicate", _duplicate), ("subtract", _subtract), ("caesar", _caesar), ("maximum", _maximum)]
}


def tokenizer() -> PreTrainedTokenizerFast:
    """The shipped character tokenizer (left padding): the gentle testbed's."""
    return gentle_tokenizer()


def checkpoint(name: str) -> Path:
    """Directory of a task's fine-tune, or for `BASE` of the gentle testbed's base they all start from."""
    if name == BASE:
        return gentle_checkpoint(BASE)
    path = ROOT / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no shipped divergent checkpoint {name!r}; run scripts/make_divergent_testbed.py")
    return path


def load(name: str) -> MixtralForCausalLM:
    """A checkpoint in float32 (the fine-tunes are stored in bfloat16: an exact upcast)."""
    return MixtralForCausalLM.from_pretrained(checkpoint(name), dtype=torch.float32).eval()


@torch.no_grad()
def expert_divergence(base: MixtralForCausalLM, tuned: MixtralForCausalLM) -> dict[str, float]:
    """How far `tuned`'s experts moved from `base`'s: {"layer {i} {tensor}": ||W_tuned - W_base|| /
    ||W_base||} for each layer's stacked expert tensors (`EXPERT_TENSORS`), computed in float32."""
    out = {}
    for index, (old, new) in enumerate(zip(base.model.layers, tuned.model.layers)):
        for tensor in EXPERT_TENSORS:
            before = getattr(old.mlp.experts, tensor).float()
            after = getattr(new.mlp.experts, tensor).float()
            out[f"layer {index} {tensor}"] = ((after - before).norm() / before.norm()).item()
    return out


__all__ = ["BASE", "EXPERT_TENSORS", "ROOT", "TASKS", "checkpoint", "expert_divergence", "load", "tokenizer"]
