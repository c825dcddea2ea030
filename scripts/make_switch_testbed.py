"""Build the shipped Switch Transformers testbed in multimoe/testbed/switch/: a word-level
tokenizer, a small seq2seq Switch base pre-trained on generic objectives, and one light FULL
fine-tune per task (every weight trains, experts included). Fixed seeds; prints each model's
ROUGE on its held-out prompts, the uniform average's, multimoe's consolidation at 1.25x and 2.0x,
the fine-tunes' relative weight changes and the run time, then checks them (below) and exits
non-zero if any fails. About 4 minutes on one CPU thread; the weights depend on the thread count,
and the shipped files are those of the default (one thread).

    python scripts/make_switch_testbed.py             # writes multimoe/testbed/switch/
    python scripts/make_switch_testbed.py --out /tmp/switch-testbed
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
from transformers.models.switch_transformers.modeling_switch_transformers import (
    load_balancing_loss_func,
    router_z_loss_func,
)
from transformers.utils import logging

import multimoe
from multimoe.evaluation import BASELINES, rouge_scores
from multimoe.testbed import Example, Task
from multimoe.testbed.switch import BASE, PRETRAINING, ROOT, SPECIAL_TOKENS, TASKS, TOKENIZER_DIR, WORDS

# One encoder and one decoder block, both sparse (sparse step 1), 16 experts: the experts hold 95% of
# the parameters (as in the Mixtral testbed), so 4 tenants' own 5% each plus a pool of 17 experts per
# layer fit in 1.25x one model, and five fp32 checkpoints stay under 8 MB. Switch's usual alternation
# (sparse step 2) would add a dense feed-forward of an expert's size per sparse block, which within
# 8 MB keeps the experts' share under the ~92% that 4 tenants at 1.25x need at all. `expert_capacity`
# counts per sequence and exceeds every testbed input, so no token is ever dropped (a token's output
# never depends on its neighbours); longer inputs than 64 tokens would start dropping.
CONFIG = dict(
    d_model=32,
    d_kv=8,
    num_heads=4,
    d_ff=160,
    num_layers=1,
    num_decoder_layers=1,
    num_sparse_encoder_layers=1,
    num_sparse_decoder_layers=1,
    num_experts=16,
    expert_capacity=64,
    router_aux_loss_coef=0.01,  # the Switch paper's load-balancing weight
    router_z_loss_coef=0.001,
    dropout_rate=0.1,  # T5 / Switch's rate, in pre-training and fine-tuning
    tie_word_embeddings=True,
    decoder_start_token_id=0,
)
# The realistic regime of the paper (switch-base-8 and its fine-tunes): a well pre-trained base and
# LIGHT full fine-tunes. The base learns generic objectives over the tasks' inputs (`PRETRAINING`:
# unshuffle a sentence, parse a sentence into a record, sort a record), so it knows the vocabulary
# and the structure but none of the four tasks (it answers their prompts with a near copy or a
# record). Each fine-tune trains every weight, experts included, for a few hundred steps at a sixth
# of the pre-training rate, with T5's dropout and the Switch paper's expert dropout (a higher rate
# inside the experts, section 2.4): the experts then move a few percent (less than the other
# weights, relatively), so the tenants can share them at little cost, while the uniform average of
# the four fine-tunes, each task vector diluted to a quarter, loses most of every task.
PRETRAIN = dict(steps=6000, lr=3e-3, seed=0, weight_decay=0.0)
FINE_TUNE = dict(steps=400, lr=5e-4, seed=1, weight_decay=0.0, expert_dropout=0.4)
BATCH = 64
# Acceptance: each fine-tune's ROUGE-1 on its task reaches TARGET and leads the base by BASE_MARGIN
# and the uniform average by AVERAGE_MARGIN. The latter is smaller because compress is a near copy
# of its input, which ROUGE-1 scores leniently: copying the whole sentence already scores ~0.8, and
# the average, which drops the day and adverb but keeps the size, ~0.95.
TARGET, BASE_MARGIN, AVERAGE_MARGIN = 0.95, 0.1, 0.04
# multimoe's consolidation at BUDGET must keep every tenant at KEPT of its own ROUGE-1.
BUDGET, KEPT = "1.25x", 0.97


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word of `WORDS`; `</s>` ends every encoded text, as T5's tokenizer does, so an
    encoded answer is a ready label sequence."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def batch(tokenizer, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded prompts; labels are the answers and their end token, padding masked out of the loss."""
    inputs = tokenizer([e.prompt for e in examples], padding=True, return_tensors="pt")
    labels = tokenizer([e.answer for e in examples], padding=True, return_tensors="pt")
    return dict(**inputs, labels=labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100))


def router_loss(config, output) -> torch.Tensor:
    """Switch's load-balancing and z losses over every router, weighted as `config` says:
    transformers adds them itself only when the sparse step is above 1."""
    loss = 0.0
    for logits in output.encoder_router_logits + output.decoder_router_logits:
        loss = loss + config.router_z_loss_coef * router_z_loss_func(logits)
        loss = loss + config.router_aux_loss_coef * load_balancing_loss_func(logits.softmax(-1), logits.argmax(-1))
    return loss


def train(model, tokenizer, tasks: Mapping[str, Task], steps: int, lr: float, seed: int, weight_decay: float = 0.0):
    """AdamW with linear warm-up and cosine decay on fresh examples of `tasks`, mixed uniformly."""
    torch.manual_seed(seed)
    pools = {name: task.training(BATCH * steps // len(tasks) + BATCH, seed=seed) for name, task in tasks.items()}
    names, rng = list(pools), random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    start = time.time()
    for step in range(steps):
        examples = [rng.choice(pools[rng.choice(names)]) for _ in range(BATCH)]
        output = model(**batch(tokenizer, examples), output_router_logits=True)
        (output.loss + router_loss(model.config, output)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 1000 == 0 or step == steps - 1:
            print(f"  step {step} loss {output.loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    return model.eval()


def set_expert_dropout(model, rate: float):
    """The Switch paper's fine-tuning regularizer ("expert dropout", section 2.4): a higher dropout
    rate inside the experts than elsewhere; only training reads it, no checkpoint records it."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and ".experts." in name:
            module.p = rate
    return model


def relative_deltas(base, tuned) -> tuple[float, float]:
    """Mean ||W_tuned - W_base|| / ||W_base|| over the expert tensors, and over every other tensor."""
    reference, experts, others = dict(base.named_parameters()), [], []
    for name, parameter in tuned.named_parameters():
        delta = ((parameter - reference[name]).norm() / reference[name].norm()).item()
        (experts if ".experts." in name else others).append(delta)
    return sum(experts) / len(experts), sum(others) / len(others)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="where the tokenizer and checkpoints go")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN["steps"])
    parser.add_argument("--fine-tune-steps", type=int, default=FINE_TUNE["steps"])
    parser.add_argument("--fine-tune-lr", type=float, default=FINE_TUNE["lr"])
    parser.add_argument("--held-out", type=int, default=200, help="held-out examples per task")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; the weights depend on it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny weights otherwise slow CPU matmuls many times over
    logging.disable_progress_bar()
    begin = time.time()
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(args.out / TOKENIZER_DIR.name)
    held_out = {name: task.held_out(args.held_out) for name, task in TASKS.items()}

    def rouge1(label: str, model, name: str, **kwargs) -> float:
        values = rouge_scores(model, tokenizer, held_out[name], **kwargs)
        print(f"{label} on {name}:", " ".join(f"{kind} {value:.3f}" for kind, value in values.items()), flush=True)
        return values["rouge1"]

    print(f"pre-training the base on {', '.join(PRETRAINING)}", flush=True)
    torch.manual_seed(PRETRAIN["seed"])
    base = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(vocab_size=len(tokenizer), **CONFIG))
    train(base, tokenizer, PRETRAINING, args.pretrain_steps, PRETRAIN["lr"], PRETRAIN["seed"], PRETRAIN["weight_decay"])
    base.save_pretrained(args.out / BASE)
    table = {name: {"base": rouge1("base", base, name)} for name in TASKS}
    tuned, deltas = {}, {}
    for index, name in enumerate(TASKS):
        print(f"fine-tuning on {name}", flush=True)
        model = set_expert_dropout(copy.deepcopy(base), FINE_TUNE["expert_dropout"])
        seed, decay = FINE_TUNE["seed"] + index, FINE_TUNE["weight_decay"]
        tuned[name] = train(model, tokenizer, {name: TASKS[name]}, args.fine_tune_steps, args.fine_tune_lr, seed, decay)
        tuned[name].save_pretrained(args.out / name)
        table[name]["fine-tune"] = rouge1("fine-tune", tuned[name], name)
        deltas[name] = relative_deltas(base, tuned[name])
    average = BASELINES["average"](base, tuned)
    for name in TASKS:
        table[name]["average"] = rouge1("average", average, name)
    calibration = {
        name: [{"prompt": e.prompt, "completion": e.answer} for e in task.training(16, seed=0)]
        for name, task in TASKS.items()
    }
    for budget in (BUDGET, "2.0x"):
        consolidated = multimoe.consolidate(
            {name: args.out / name for name in TASKS}, memory_budget=budget, similarity="output", merge="keep_anchor",
            anchor="most_sensitive", calibration=calibration, tokenizer=tokenizer, progress=False,
        )
        print(f"consolidated at {budget}: anchor {consolidated.consolidation_report.anchor}", flush=True)
        for name in TASKS:
            table[name][budget] = rouge1(f"consolidated {budget}", consolidated, name, tenant=name)
    print(f"done in {time.time() - begin:.0f} s with {torch.get_num_threads()} threads\n", flush=True)
    columns = ["base", "fine-tune", "average", BUDGET, "2.0x"]
    print(f"ROUGE-1 on {args.held_out} held-out prompts per task; relative weight change of the fine-tunes")
    print(f"| task | {' | '.join(columns)} | expert delta | other delta |")
    print("|---|" + "---:|" * (len(columns) + 2))
    for name, row in table.items():
        cells = [f"{row[column]:.3f}" for column in columns] + [f"{delta:.4f}" for delta in deltas[name]]
        print(f"| {name} | {' | '.join(cells)} |")
    failures = []
    for name, row in table.items():
        for rival, margin in (("base", BASE_MARGIN), ("average", AVERAGE_MARGIN)):
            if row["fine-tune"] < max(TARGET, row[rival] + margin):
                tuned_score, rival_score = row["fine-tune"], row[rival]
                failures.append(f"{name}: fine-tune {tuned_score:.3f} < {TARGET} or < {rival} {rival_score:.3f} + {margin}")
        if row[BUDGET] < KEPT * row["fine-tune"]:
            failures.append(f"{name}: consolidated at {BUDGET} keeps {row[BUDGET] / row['fine-tune']:.1%} < {KEPT:.0%}")
    if failures:
        raise SystemExit("\n".join(failures))
    print("every check passed")


if __name__ == "__main__":
    main()
