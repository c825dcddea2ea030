"""Build the shipped divergent testbed in multimoe/testbed/divergent/: one FULL fine-tune (every
weight trains, experts included) of the shipped base multimoe/testbed/base per divergent task, in
large steps so that the experts move >= 30% from the base, each saved in bfloat16 with its own copy
of the character tokenizer and chat template. Fixed seeds; the weights depend on the thread count,
and the shipped files are those of the default (one thread). A few CPU minutes.

Prints each task's exact match for the base and for the fine-tune (on 200 held-out prompts, of the
bfloat16 checkpoint as saved and loaded back in float32) and the experts' movement per layer, then
checks them (below) and exits non-zero, writing nothing, if any check fails.

    python scripts/make_divergent_testbed.py             # writes multimoe/testbed/divergent/
    python scripts/make_divergent_testbed.py --out /tmp/divergent-testbed
    python scripts/make_divergent_testbed.py --tokenizers-only   # rewrite the per-checkpoint tokenizers alone
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from transformers import MixtralForCausalLM

from multimoe.evaluation import exact_match
from multimoe.testbed.divergent import BASE, ROOT, TASKS, expert_divergence, load, tokenizer
from multimoe.testing import character_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a sibling script, not a package
import make_testbed  # noqa: E402

# Large steps: ten times the gentle fine-tunes' rate (5e-4), above the base's own pre-training rate
# (3e-3), for 1000 steps (gentle: 300); every layer's experts then move >= 30% (32-97%).
FINE_TUNE = dict(steps=1000, lr=5e-3, seed=1)
TARGET = 0.9  # each fine-tune's exact match on its own held-out prompts
BASE_CEILING = 0.1  # the base's, on each task: it must lack the skill
MOVED = 0.3  # each tenant's mean relative movement of its expert tensors


def train(model: MixtralForCausalLM, tokenizer, name: str, steps: int, lr: float, seed: int) -> MixtralForCausalLM:
    """`make_testbed.train` on one divergent task: it draws examples from its module's task registry,
    which this call points at the divergent testbed's."""
    with mock.patch.object(make_testbed, "TASKS", TASKS):
        return make_testbed.train(model, tokenizer, [name], steps, lr, seed)


def write_tokenizer(name: str, path: Path) -> None:
    """A checkpoint's own copy of the character tokenizer, with a chat template naming it."""
    own = character_tokenizer()
    own.chat_template = make_testbed.chat_template(name)
    own.save_pretrained(path)


def save(model: MixtralForCausalLM, name: str, path: Path) -> None:
    """The checkpoint in bfloat16, with its tokenizer."""
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)
    write_tokenizer(name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=FINE_TUNE["steps"])
    parser.add_argument("--lr", type=float, default=FINE_TUNE["lr"])
    parser.add_argument(
        "--threads", type=int, default=1, help="the shipped testbed was made with 1; results depend on it"
    )
    parser.add_argument("--out", type=Path, default=ROOT)
    parser.add_argument("--tokenizers-only", action="store_true", help="only write each checkpoint's tokenizer")
    args = parser.parse_args()
    if args.tokenizers_only:
        for name in TASKS:
            write_tokenizer(name, args.out / name)
        return
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny weights otherwise slow CPU matmuls many times over
    start, tok, base = time.time(), tokenizer(), load(BASE)
    failures, rows = [], []
    with tempfile.TemporaryDirectory() as staging:
        for index, (name, task) in enumerate(TASKS.items()):
            began, held_out = time.time(), task.held_out()
            base_score = exact_match(base, tok, held_out)
            tuned = train(copy.deepcopy(base), tok, name, args.steps, args.lr, FINE_TUNE["seed"] + index)
            save(tuned, name, Path(staging) / name)
            # What ships: the bfloat16 checkpoint, loaded back in float32.
            shipped = MixtralForCausalLM.from_pretrained(Path(staging) / name, dtype=torch.float32).eval()
            score, moved = exact_match(shipped, tok, held_out), expert_divergence(base, shipped)
            mean = sum(moved.values()) / len(moved)
            print(f"{name} ({time.time() - began:.0f} s): base {base_score:.3f}, fine-tune {score:.3f}; experts moved "
                  + ", ".join(f"{key} {value:.3f}" for key, value in moved.items()) + f"; mean {mean:.3f}", flush=True)
            rows.append([name, base_score, score, *moved.values(), mean])
            if base_score >= BASE_CEILING:
                failures.append(f"the base scores {base_score:.3f} >= {BASE_CEILING} on {name}: choose a task it lacks")
            if score < TARGET:
                failures.append(f"{name} fine-tune scores {score:.3f} < {TARGET}: raise steps / lower lr")
            if mean < MOVED:
                failures.append(f"{name}'s experts moved {mean:.3f} < {MOVED} on average: raise lr / steps")
        print("\n| task | base | fine-tune | " + " | ".join(moved) + " | mean |")
        print("|---|" + "---:|" * (len(rows[0]) - 1))
        for name, *values in rows:
            print(f"| {name} | " + " | ".join(f"{value:.3f}" for value in values) + " |")
        print(f"\n{time.time() - start:.0f} s in all", flush=True)
        if failures:
            raise SystemExit("not written:\n" + "\n".join(failures))
        for name in TASKS:
            shutil.rmtree(args.out / name, ignore_errors=True)
            shutil.copytree(Path(staging) / name, args.out / name)

if __name__ == "__main__":
    main()
