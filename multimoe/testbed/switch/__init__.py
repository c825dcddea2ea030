"""A tiny, shipped Switch Transformers seq2seq testbed: a word-level tokenizer, a base pre-trained
on generic objectives, and one light full fine-tune per task (made by
`scripts/make_switch_testbed.py`), scored with ROUGE (`multimoe.evaluation.rouge_scores`).

The four tasks read the same kind of input (a short event: who did what to which object, where,
maybe when) and each writes a different text of several words from it, over one 101-word
vocabulary:

- `keywords`: the name, object, city and day of a sentence, in the order they appear;
- `compress`: the sentence without its day, adverb and size phrase;
- `title`: a headline "colour object <verb as a noun> in city" (e.g. "red car purchase in paris");
- `describe`: data-to-text, a sentence from a shuffled "field value" record.

Each prompt starts with its task's name, as in T5. The base never sees these tasks: it is
pre-trained (6000 steps) on generic objectives over the same inputs (`PRETRAINING`: restore a
shuffled sentence, parse a sentence into a record with the verb's noun, sort a shuffled record),
each with its own prefix word, so it knows the vocabulary and the structure and answers the tasks'
prompts with a near copy or a record. Each fine-tune then trains every weight, experts included,
briefly (400 steps at a sixth of the pre-training rate, with dropout and the Switch paper's expert
dropout): the regime of the paper, whose tenants are light fine-tunes of switch-base-8. The
experts move ~4-6% (relative norm of the change) and less than the other weights (~6-10%), so
sharing them across tenants costs little, while the uniform average of the four fine-tunes, each
task vector diluted to a quarter, loses most of every task. The build script checks and prints
(ROUGE-1 on 200 held-out prompts per task; "1.25x" and "2.0x": `multimoe.consolidate` with the
output metric, `keep_anchor`, the most sensitive anchor and 16 calibration pairs per tenant):

| task | base | fine-tune | uniform average | consolidated 1.25x | 2.0x |
|---|---:|---:|---:|---:|---:|
| keywords | 0.361 | 0.982 | 0.365 | 0.982 | 0.982 |
| compress | 0.812 | 1.000 | 0.952 | 1.000 | 1.000 |
| title | 0.361 | 1.000 | 0.550 | 1.000 | 1.000 |
| describe | 0.572 | 1.000 | 0.572 | 1.000 | 1.000 |

Checks: every fine-tune >= 0.95, >= base + 0.1 and >= average + 0.04 (compress is a near copy of
its input, which ROUGE-1 scores leniently: the average, which drops the day and adverb but keeps
the size, still scores ~0.95), and consolidation at 1.25x keeps every tenant >= 97% of its own
ROUGE-1.
"""

from __future__ import annotations

import random
from pathlib import Path

from transformers import PreTrainedTokenizerFast, SwitchTransformersForConditionalGeneration

from .. import Example, Task

ROOT = Path(__file__).parent
TOKENIZER_DIR = ROOT / "tokenizer"
BASE = "base"

# T5 / Switch convention: pad (0) doubles as the decoder's start token, eos is 1.
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
NAMES = "anna ben carl dora emil fay gus hana ivan june kurt lena".split()
# Past tense -> the noun a headline uses for it.
VERBS = {
    "bought": "purchase", "sold": "sale", "painted": "painting", "found": "discovery", "lost": "loss",
    "built": "construction", "fixed": "repair", "stole": "theft", "rented": "rental", "delivered": "delivery",
}
COLORS = "red blue green black white yellow brown grey".split()
SIZES = "old new small big tiny huge".split()
INTENSIFIERS = "very quite rather".split()
NOUNS = "car house boat bike lamp piano table clock bridge garden tower kite".split()
CITIES = "paris rome oslo lima cairo tokyo berlin madrid vienna dublin".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
ADVERBS = "quietly quickly suddenly finally proudly slowly secretly happily".split()
FUNCTION_WORDS = "a the in on".split()
FIELDS = "name action size color item city day".split()
PREFIXES = "keywords compress title describe".split()
WORDS = (
    PREFIXES + FIELDS + FUNCTION_WORDS + NAMES + list(VERBS) + list(VERBS.values()) + COLORS + SIZES
    + INTENSIFIERS + NOUNS + CITIES + DAYS + ADVERBS
)


def _event(rng: random.Random) -> dict[str, str | None]:
    """One event; day, size (with an optional intensifier) and adverb are optional, and the day and
    adverb go before or after the rest, so a sentence's shape varies as much as its words."""
    size = rng.choice(SIZES) if rng.random() < 0.5 else None
    return dict(
        name=rng.choice(NAMES), verb=rng.choice(list(VERBS)), color=rng.choice(COLORS), noun=rng.choice(NOUNS),
        city=rng.choice(CITIES), det=rng.choice(("a", "the")), size=size,
        intensifier=rng.choice(INTENSIFIERS) if size and rng.random() < 0.5 else None,
        day=rng.choice(DAYS) if rng.random() < 0.6 else None, day_first=rng.random() < 0.5,
        adverb=rng.choice(ADVERBS) if rng.random() < 0.6 else None, adverb_first=rng.random() < 0.5,
    )


def _sentence(e: dict) -> list[str]:
    day = ["on", e["day"]] if e["day"] else []
    adverb = [e["adverb"]] if e["adverb"] else []
    words = (day if e["day_first"] else []) + [e["name"]] + (adverb if e["adverb_first"] else [])
    words += [e["verb"], e["det"]] + [w for w in (e["intensifier"], e["size"]) if w] + [e["color"], e["noun"]]
    words += ["in", e["city"]] + ([] if e["adverb_first"] else adverb) + ([] if e["day_first"] else day)
    return words


def _keywords(rng: random.Random) -> Example:
    sentence = _sentence(_event(rng))
    keep = set(NAMES) | set(NOUNS) | set(CITIES) | set(DAYS)
    return Example(" ".join(["keywords"] + sentence), " ".join(w for w in sentence if w in keep))


def _compress(rng: random.Random) -> Example:
    e = _event(rng)
    answer = [e["name"], e["verb"], e["det"], e["color"], e["noun"], "in", e["city"]]
    return Example(" ".join(["compress"] + _sentence(e)), " ".join(answer))


def _title(rng: random.Random) -> Example:
    e = _event(rng)
    answer = [e["color"], e["noun"], VERBS[e["verb"]], "in", e["city"]]
    return Example(" ".join(["title"] + _sentence(e)), " ".join(answer))


def _record(e: dict, noun: bool = False) -> list[str]:
    """The event as "field value" pairs in `FIELDS` order, absent fields left out; the action is the
    verb, or with `noun` the verb's noun (as a database would store the event's kind)."""
    action = VERBS[e["verb"]] if noun else e["verb"]
    values = dict(
        name=e["name"], action=action, size=e["size"], color=e["color"], item=e["noun"], city=e["city"], day=e["day"]
    )
    return [w for field in FIELDS if values[field] for w in (field, values[field])]


def _shuffled_record(e: dict, rng: random.Random) -> list[str]:
    record = _record(e)
    pairs = [record[i : i + 2] for i in range(0, len(record), 2)]
    rng.shuffle(pairs)
    return [w for pair in pairs for w in pair]


def _describe(rng: random.Random) -> Example:
    e = _event(rng)
    answer = (["on", e["day"]] if e["day"] else []) + [e["name"], e["verb"], "a"]
    answer += ([e["size"]] if e["size"] else []) + [e["color"], e["noun"], "in", e["city"]]
    return Example(" ".join(["describe"] + _shuffled_record(e, rng)), " ".join(answer))


TASKS: dict[str, Task] = {
    name: Task(name, make)
    for name, make in [("keywords", _keywords), ("compress", _compress), ("title", _title), ("describe", _describe)]
}


# The base's generic pre-training objectives: they read the tasks' inputs (sentences and records)
# and write none of the tasks' answers. Each prompt starts with a prefix word of the shared
# vocabulary that its input never contains (a field name before a sentence, "the" before a record),
# so the vocabulary stays the tasks' own; `parse` writes the verb's noun, so the base has produced
# every word of the vocabulary but the task names.
def _unshuffle(rng: random.Random) -> Example:
    sentence = _sentence(_event(rng))
    shuffled = rng.sample(sentence, len(sentence))
    return Example(" ".join(["action"] + shuffled), " ".join(sentence))


def _parse(rng: random.Random) -> Example:
    e = _event(rng)
    return Example(" ".join(["name"] + _sentence(e)), " ".join(_record(e, noun=True)))


def _sort(rng: random.Random) -> Example:
    e = _event(rng)
    return Example(" ".join(["the"] + _shuffled_record(e, rng)), " ".join(_record(e)))


PRETRAINING: dict[str, Task] = {
    name: Task(name, make) for name, make in [("unshuffle", _unshuffle), ("parse", _parse), ("sort", _sort)]
}


def tokenizer() -> PreTrainedTokenizerFast:
    """The shipped word-level tokenizer: one token per word of `WORDS`, `</s>` appended, right padding."""
    return PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR)


def checkpoint(name: str) -> Path:
    """Directory of the shipped `base` or of a task's fine-tune."""
    path = ROOT / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no shipped Switch checkpoint {name!r}; run scripts/make_switch_testbed.py")
    return path


def load(name: str) -> SwitchTransformersForConditionalGeneration:
    return SwitchTransformersForConditionalGeneration.from_pretrained(checkpoint(name)).eval()


__all__ = [
    "BASE", "PRETRAINING", "ROOT", "SPECIAL_TOKENS", "TASKS", "TOKENIZER_DIR", "WORDS",
    "checkpoint", "load", "tokenizer",
]
