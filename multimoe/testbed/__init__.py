"""A tiny, shipped testbed: a character tokenizer, a small Mixtral base pre-trained on four
exact-match tasks, and one full fine-tune per task (made by `scripts/make_testbed.py`). Each
checkpoint also carries the tokenizer, with a chat template of its own that renders a conversation
as its last message: the task prompt, so that a chat completion answers the task.

It exists so merge quality can be measured on a CPU in minutes: each fine-tune scores >= 90% exact
match on its own held-out prompts, so any accuracy a merge loses is visible.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import MixtralForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).parent
TOKENIZER_DIR = ROOT / "tokenizer"
BASE = "base"
TASKS: dict[str, Task] = {}


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """An exact-match task: `make(rng)` draws one example; a prompt always ends with "="."""

    name: str
    make: Callable[[random.Random], Example]

    def held_out(self, count: int = 200) -> list[Example]:
        """The evaluation prompts (distinct); training never sees them."""
        rng, seen, out = random.Random(HELD_OUT_SEED), set(), []
        while len(out) < count:
            example = self.make(rng)
            if example.prompt not in seen:
                seen.add(example.prompt)
                out.append(example)
        return out

    def training(self, count: int, seed: int) -> list[Example]:
        """`count` examples drawn with `seed` (repeats allowed), none of them a held-out prompt."""
        rng, held, out = random.Random(seed), {e.prompt for e in self.held_out()}, []
        while len(out) < count:
            example = self.make(rng)
            if example.prompt not in held:
                out.append(example)
        return out


HELD_OUT_SEED = 12345


def register_task(name: str):
    def register(make: Callable[[random.Random], Example]):
        TASKS[name] = Task(name, make)
        return make

    return register


def _letters(rng: random.Random, low: int = 3, high: int = 5) -> str:
    return "".join(rng.choice(string.ascii_lowercase[:12]) for _ in range(rng.randint(low, high)))


@register_task("add")
def _add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example(f"{a}+{b}=", str(a + b))


@register_task("reverse")
def _reverse(rng: random.Random) -> Example:
    word = _letters(rng)
    return Example(f"rev {word}=", word[::-1])


@register_task("sort")
def _sort(rng: random.Random) -> Example:
    word = _letters(rng)
    return Example(f"sort {word}=", "".join(sorted(word)))


@register_task("shift")
def _shift(rng: random.Random) -> Example:
    word = _letters(rng)
    return Example(f"next {word}=", "".join(chr(ord(c) + 1) for c in word))


def tokenizer() -> PreTrainedTokenizerFast:
    """The shipped character tokenizer (left padding)."""
    return PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR)


def checkpoint(name: str) -> Path:
    """Directory of the shipped `base` or of a task's fine-tune."""
    path = ROOT / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no shipped checkpoint {name!r}; run scripts/make_testbed.py")
    return path


def load(name: str) -> MixtralForCausalLM:
    return MixtralForCausalLM.from_pretrained(checkpoint(name)).eval()


__all__ = ["BASE", "TASKS", "Example", "Task", "checkpoint", "load", "register_task", "tokenizer"]
