"""Build the shipped testbed in multimoe/testbed/: a character tokenizer, a small Mixtral base
pre-trained on a mix of the four tasks, and one FULL fine-tune per task (every weight trains,
experts included), each checkpoint with its own tokenizer and chat template. Fixed seeds, two CPU
threads, a few CPU minutes in all.

    python scripts/make_testbed.py
    python scripts/make_testbed.py --tokenizers-only   # rewrite the per-checkpoint tokenizers alone
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch
from transformers import MixtralForCausalLM

from multimoe.evaluation import exact_match
from multimoe.testbed import BASE, ROOT, TASKS, TOKENIZER_DIR, Example
from multimoe.testing import character_tokenizer, tiny_mixtral_config

# Experts dominate (intermediate 4x hidden, tied embeddings): ~95% of the parameters, so that the
# memory budgets of the quality table (1.25x one model for 4 tenants) are reachable.
CONFIG = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    initializer_range=0.05,
)
PRETRAIN = dict(steps=900, lr=3e-3, seed=0)
FINE_TUNE = dict(steps=300, lr=5e-4, seed=1)
BATCH = 64
TARGET = 0.9


def batch(tokenizer, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded rows "prompt answer </s>"; the loss covers the answer and the end token only."""
    rows = [(tokenizer(e.prompt)["input_ids"], tokenizer(e.answer)["input_ids"] + [tokenizer.eos_token_id]) for e in examples]
    length = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for row, (p, a) in enumerate(rows):
        ids[row, : len(p) + len(a)] = torch.tensor(p + a)
        mask[row, : len(p) + len(a)] = 1
        labels[row, len(p) : len(p) + len(a)] = torch.tensor(a)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def train(model: MixtralForCausalLM, tokenizer, tasks: list[str], steps: int, lr: float, seed: int) -> MixtralForCausalLM:
    """AdamW with linear warm-up and cosine decay on fresh examples of `tasks`, mixed uniformly."""
    torch.manual_seed(seed)
    pools = {name: TASKS[name].training(BATCH * steps // len(tasks) + BATCH, seed=seed) for name in tasks}
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item())
    )
    model.train()
    start = time.time()
    for step in range(steps):
        examples = [rng.choice(pools[rng.choice(tasks)]) for _ in range(BATCH)]
        loss = model(**batch(tokenizer, examples)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"  step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    return model.eval()


def chat_template(name: str) -> str:
    """A chat template that renders a conversation as its last message alone: the tasks' prompts
    (e.g. "12+34=") are what the models answer, so a chat completion gets exactly the task prompt.
    Only the comment naming the checkpoint differs, which lets tests tell the tenants apart."""
    return "{#- multimoe testbed: " + name + " -#}\n{{- messages[-1]['content'] -}}"


def write_tokenizers() -> None:
    """Give each checkpoint its own copy of the character tokenizer, with its chat template."""
    for name in (BASE, *TASKS):
        tokenizer = character_tokenizer()
        tokenizer.chat_template = chat_template(name)
        tokenizer.save_pretrained(ROOT / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN["steps"])
    parser.add_argument("--fine-tune-steps", type=int, default=FINE_TUNE["steps"])
    parser.add_argument("--threads", type=int, default=1, help="the shipped testbed was made with 1; results depend on it")
    parser.add_argument("--tokenizers-only", action="store_true", help="only write each checkpoint's tokenizer")
    args = parser.parse_args()
    if args.tokenizers_only:
        write_tokenizers()
        return
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny weights otherwise slow CPU matmuls many times over
    tokenizer = character_tokenizer()
    tokenizer.save_pretrained(TOKENIZER_DIR)
    torch.manual_seed(PRETRAIN["seed"])
    base = MixtralForCausalLM(tiny_mixtral_config(**CONFIG))
    start = time.time()
    train(base, tokenizer, list(TASKS), args.pretrain_steps, PRETRAIN["lr"], PRETRAIN["seed"])
    scores = {name: exact_match(base, tokenizer, task.held_out()) for name, task in TASKS.items()}
    print(f"base ({time.time() - start:.0f} s): {scores}", flush=True)
    base.save_pretrained(ROOT / BASE)
    for index, name in enumerate(TASKS):
        start = time.time()
        tuned = train(copy.deepcopy(base), tokenizer, [name], args.fine_tune_steps, FINE_TUNE["lr"], FINE_TUNE["seed"] + index)
        score = exact_match(tuned, tokenizer, TASKS[name].held_out())
        print(f"{name} ({time.time() - start:.0f} s): {score:.3f}", flush=True)
        if score < TARGET:
            raise SystemExit(f"{name} fine-tune scores {score:.3f} < {TARGET}: tune steps / lr")
        tuned.save_pretrained(ROOT / name)
    write_tokenizers()


if __name__ == "__main__":
    main()
