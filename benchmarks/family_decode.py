"""One tenant's greedy generation speed, multi-tenant class vs the family's own class, for each built-in family.

For every family: a model at the family's real proportions, scaled down to `--hidden` (the real
config's intermediate sizes, head count and LoRA ranks scale with hidden_size; head dims, expert
counts and top-k stay real; gpt-oss uses gpt-oss-20b's 32 experts; Switch is switch-base-8, the paper's
model, with `--layers` blocks in each stack; its prompt goes to the encoder), is wrapped as the only tenant
of `multimoe.from_models`. Both classes then generate the same greedy tokens from the same prompt
(batch 1, KV cache on, exactly `--new-tokens` tokens); whole `generate` calls alternate between the
two (which goes first alternates too), and tokens/s is new tokens over the median call time. The
goal: the multi-tenant class keeps >= 0.97 of the family's own speed.

    python benchmarks/family_decode.py                                  # the measurement (quiet machine)
    python benchmarks/family_decode.py --hidden 128 --layers 2 --new-tokens 4 --repeats 1   # smoke test
    python benchmarks/family_decode.py --families mixtral gpt_oss

Rates include the prefill of the short prompt (8 tokens), the same for both classes. Each family
takes well under a minute at the defaults on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers.utils import logging

import multimoe
from multimoe.families import EXPERT_COUNT_FIELDS, FAMILIES

BUILT_IN = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "switch_transformers")
GOAL = 0.97
PROMPT_LENGTH = 8
# Where the family's default config is not the checkpoint to scale: gpt-oss's default is the
# 120B (128 experts); the 20B has 32. DeepSeek-V3's first 3 of 61 layers are dense: keep one.
REAL_OVERRIDES = {"gpt_oss": dict(num_local_experts=32), "deepseek_v3": dict(first_k_dense_replace=1)}
# google/switch-base-8 (the paper's model); the config class defaults differ in d_ff and sparse step.
SWITCH_BASE_8 = dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_experts=8, encoder_sparse_step=2,
                     decoder_sparse_step=2, expert_capacity=64)
LORA_RANKS = ("q_lora_rank", "kv_lora_rank")


def round_to(value: float, multiple: int = 16) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def switch_config(hidden: int, layers: int, vocab: int, max_experts: int | None):
    """switch-base-8 scaled to `hidden`: d_ff and the head count scale, head width and experts stay;
    `layers` blocks in each of encoder and decoder, every other one sparse."""
    scale = hidden / SWITCH_BASE_8["d_model"]
    fields = SWITCH_BASE_8 | dict(
        d_model=hidden, d_ff=round_to(SWITCH_BASE_8["d_ff"] * scale), num_heads=max(1, round(SWITCH_BASE_8["num_heads"] * scale)),
        num_layers=layers, num_decoder_layers=layers, vocab_size=vocab, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )
    fields["num_experts"] = min(fields["num_experts"], max_experts or fields["num_experts"])
    return FAMILIES["switch_transformers"].config_class(**fields)


def scaled_config(model_type: str, hidden: int, layers: int, vocab: int, max_experts: int | None):
    """The family's default config with its widths scaled to `hidden` (see the module docstring)."""
    if model_type == "switch_transformers":
        return switch_config(hidden, layers, vocab, max_experts)
    family = FAMILIES[model_type]
    real = family.config_class(**REAL_OVERRIDES.get(model_type, {}))
    scale = hidden / real.hidden_size
    fields = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields |= REAL_OVERRIDES.get(model_type, {})
    for key, value in real.to_dict().items():
        if key.endswith("intermediate_size") and isinstance(value, int) and value > 0:
            fields[key] = round_to(value * scale)
        elif key in LORA_RANKS and isinstance(value, int):
            fields[key] = round_to(value * scale)
        elif key in EXPERT_COUNT_FIELDS and isinstance(value, int) and max_experts is not None:
            fields[key] = min(value, max_experts)
    heads = max(1, round(real.num_attention_heads * scale))
    kv_heads = max(1, round(real.num_key_value_heads * scale))
    while heads % kv_heads:
        kv_heads -= 1
    fields |= dict(num_attention_heads=heads, num_key_value_heads=kv_heads)
    if getattr(real, "head_dim", None) is not None and model_type != "deepseek_v3":
        fields["head_dim"] = real.head_dim  # real head width, fewer heads (DeepSeek's is its rope dim)
    if isinstance(getattr(real, "mlp_only_layers", None), list):
        fields["mlp_only_layers"] = [index for index in real.mlp_only_layers if index < layers]
    stored = real.to_dict()  # (not hasattr: a config's attribute_map aliases the other count names)
    experts = next(fields.get(key, stored[key]) for key in EXPERT_COUNT_FIELDS if key in stored)
    fields["num_experts_per_tok"] = min(real.num_experts_per_tok, experts)
    if model_type == "deepseek_v3":  # routing groups of at least 2 experts that divide them (when capped)
        groups = real.n_group
        while groups > 1 and (experts % groups or experts // groups < 2):
            groups //= 2
        fields |= dict(n_group=groups, topk_group=min(real.topk_group, groups))
    return family.config_class(**fields)


def shapes(config) -> str:
    family = FAMILIES[config.model_type]
    if family.is_encoder_decoder:
        sparse = sum(family.sparse_layers(config))
        return (f"{config.num_layers}+{config.num_decoder_layers} blocks ({sparse} sparse), d_model={config.d_model}, "
                f"d_ff={config.d_ff}, {config.num_heads}x{config.d_kv} heads, {config.num_experts} experts top-1, "
                f"capacity {config.expert_capacity}, vocab {config.vocab_size}")
    experts = next(value for key, value in config.to_dict().items() if key in EXPERT_COUNT_FIELDS)
    top_k = getattr(config, "num_experts_per_tok", None)
    widths = ", ".join(
        f"{key.replace('_intermediate_size', '').replace('intermediate_size', 'I')}={value}"
        for key, value in config.to_dict().items()
        if key.endswith("intermediate_size") and isinstance(value, int) and value > 0
    )
    sparse = sum(family.sparse_layers(config))
    if getattr(config, "kv_lora_rank", None):  # latent attention
        attention = (
            f"{config.num_attention_heads} heads (q_lora {config.q_lora_rank}, kv_lora {config.kv_lora_rank}, "
            f"qk {config.qk_nope_head_dim}+{config.qk_rope_head_dim}, v {config.v_head_dim})"
        )
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attention = f"{config.num_attention_heads}x{head_dim} heads / {config.num_key_value_heads} kv"
    return (
        f"{config.num_hidden_layers} layers ({sparse} sparse), H={config.hidden_size}, {widths}, {attention}, "
        f"{experts} experts top-{top_k}, vocab {config.vocab_size}"
    )


def generate_seconds(model, prompt: torch.Tensor, new_tokens: int, **options) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    output = model.generate(
        prompt,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # a fixed count: an early EOS would change the work
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        **options,
    )
    return time.perf_counter() - start, output


def measure(model_type: str, args) -> dict:
    config = scaled_config(model_type, args.hidden, args.layers, args.vocab, args.max_experts)
    torch.manual_seed(0)
    own = FAMILIES[model_type].model_class(config).eval()
    multi = multimoe.from_models({"t0": own}).eval()
    assert multi.config._attn_implementation == own.config._attn_implementation, "compare like with like"
    prompt = torch.randint(3, config.vocab_size, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0))
    timings = {"own": [], "multimoe": []}
    with torch.inference_mode():
        # Warm-up, and the check that makes the speeds comparable: the same tokens.
        _, expected = generate_seconds(own, prompt, args.new_tokens)
        _, got = generate_seconds(multi, prompt, args.new_tokens, tenant="t0")
        assert torch.equal(expected, got), f"{model_type}: the multi-tenant model generates other tokens"
        for repeat in range(args.repeats):
            order = ("own", "multimoe") if repeat % 2 == 0 else ("multimoe", "own")
            for which in order:
                model, options = (own, {}) if which == "own" else (multi, {"tenant": "t0"})
                seconds, _ = generate_seconds(model, prompt, args.new_tokens, **options)
                timings[which].append(seconds)
    own_rate = args.new_tokens / statistics.median(timings["own"])
    multi_rate = args.new_tokens / statistics.median(timings["multimoe"])
    return dict(
        family=model_type,
        class_name=FAMILIES[model_type].model_class.__name__,
        shapes=shapes(config),
        own=own_rate,
        multi=multi_rate,
        ratio=multi_rate / own_rate,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(BUILT_IN), choices=BUILT_IN, metavar="MODEL_TYPE")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed generate calls per class (median)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-experts", type=int, default=None, help="cap the real expert counts (memory)")
    args = parser.parse_args()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch 1, greedy, KV cache on, "
          f"prompt {PROMPT_LENGTH} tokens, {args.new_tokens} new tokens, median of {args.repeats} alternating calls")
    print()
    print("| family | shapes | own class tok/s | multimoe tok/s | ratio | goal >= 0.97 met? |")
    print("|---|---|---:|---:|---:|---|")
    for model_type in args.families:
        started = time.perf_counter()
        row = measure(model_type, args)
        met = "yes" if row["ratio"] >= GOAL else "**no**"
        print(
            f"| `{row['family']}` ({row['class_name']}) | {row['shapes']} | {row['own']:.1f} | {row['multi']:.1f} "
            f"| {row['ratio']:.3f} | {met} |",
            flush=True,
        )
        print(f"  ({model_type}: {time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
