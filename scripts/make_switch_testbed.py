"""Build the shipped Switch Transformers testbed in multimoe/testbed/switch/: a word-level
tokenizer, a small seq2seq Switch base pre-trained on a mix of the four tasks, and one FULL
fine-tune per task (every weight trains, experts included). Fixed seeds; prints each model's
ROUGE on its held-out prompts and the run time.

    python scripts/make_switch_testbed.py
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
from transformers.models.switch_transformers.modeling_switch_transformers import (
    load_balancing_loss_func,
    router_z_loss_func,
)
from transformers.utils import logging

from multimoe.evaluation import BASELINES, rouge_scores
from multimoe.testbed import Example
from multimoe.testbed.switch import BASE, ROOT, SPECIAL_TOKENS, TASKS, TOKENIZER_DIR, WORDS

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
    dropout_rate=0.0,
    tie_word_embeddings=True,
    decoder_start_token_id=0,
)
# A short pre-training leaves the base well short of every task (ROUGE-1 ~0.6-0.75), so each
# fine-tune moves far from it, in its own direction: the uniform average of the four then loses
# ROUGE on every task, as merges do in the paper.
PRETRAIN = dict(steps=200, lr=3e-3, seed=0)
FINE_TUNE = dict(steps=600, lr=1e-3, seed=1)
BATCH = 64
TARGET, MARGIN = 0.95, 0.1  # a fine-tune's ROUGE-1 on its task, and its lead over the base and the average


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


def train(model, tokenizer, tasks: list[str], steps: int, lr: float, seed: int):
    """AdamW with linear warm-up and cosine decay on fresh examples of `tasks`, mixed uniformly."""
    torch.manual_seed(seed)
    pools = {name: TASKS[name].training(BATCH * steps // len(tasks) + BATCH, seed=seed) for name in tasks}
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    start = time.time()
    for step in range(steps):
        examples = [rng.choice(pools[rng.choice(tasks)]) for _ in range(BATCH)]
        output = model(**batch(tokenizer, examples), output_router_logits=True)
        (output.loss + router_loss(model.config, output)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 200 == 0:
            print(f"  step {step} loss {output.loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    return model.eval()


def scores(label: str, model, tokenizer, name: str) -> dict[str, float]:
    values = rouge_scores(model, tokenizer, TASKS[name].held_out())
    print(f"{label} on {name}:", " ".join(f"{kind} {value:.3f}" for kind, value in values.items()), flush=True)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN["steps"])
    parser.add_argument("--fine-tune-steps", type=int, default=FINE_TUNE["steps"])
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads; the weights depend on it (the shipped testbed: 1)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny weights otherwise slow CPU matmuls many times over
    logging.disable_progress_bar()
    begin = time.time()
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(TOKENIZER_DIR)
    torch.manual_seed(PRETRAIN["seed"])
    base = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(vocab_size=len(tokenizer), **CONFIG))
    train(base, tokenizer, list(TASKS), args.pretrain_steps, PRETRAIN["lr"], PRETRAIN["seed"])
    base_scores = {name: scores("base", base, tokenizer, name) for name in TASKS}
    base.save_pretrained(ROOT / BASE)
    tuned, tuned_scores = {}, {}
    for index, name in enumerate(TASKS):
        seed = FINE_TUNE["seed"] + index
        tuned[name] = train(copy.deepcopy(base), tokenizer, [name], args.fine_tune_steps, FINE_TUNE["lr"], seed)
        tuned_scores[name] = scores("fine-tune", tuned[name], tokenizer, name)
        tuned[name].save_pretrained(ROOT / name)
    average = BASELINES["average"](base, tuned)
    average_scores = {name: scores("average", average, tokenizer, name) for name in TASKS}
    print(f"done in {time.time() - begin:.0f} s with {torch.get_num_threads()} threads", flush=True)
    for name, values in tuned_scores.items():
        rival = max(base_scores[name]["rouge1"], average_scores[name]["rouge1"])
        if values["rouge1"] < TARGET or values["rouge1"] < rival + MARGIN:
            raise SystemExit(f"{name}: fine-tune ROUGE-1 {values['rouge1']:.3f} < {TARGET} or < {rival:.3f} + {MARGIN}")


if __name__ == "__main__":
    main()
