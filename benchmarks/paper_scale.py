"""The paper-scale check: 8 tenants at Mixtral-8x7B's shape on one GPU, random weights built on the
device (no checkpoint), in bfloat16.

1. Memory: what the 8-tenant model holds on the device against the arithmetic, 90.2 GB of experts
   (held once) plus 3.21 GB of each tenant's own layers (attention, norms, router, embedding,
   lm_head), 115.9 GB for 8.
2. Decode: a batch with one row per tenant against a batch of as many rows of one tenant (greedy
   steps with a KV cache, interleaved; tokens/s from the median step).
3. One tenant against `MixtralForCausalLM` at the same shape. The 8-tenant model and a plain
   Mixtral (93.4 GB) cannot sit on a 141 GB GPU together, so the 8-tenant model is freed first and
   the two are measured one after the other: a 1-tenant multi-tenant model, then the plain model.

    python benchmarks/paper_scale.py --device cuda --out DIR            # on an H200 (scripts/gpu_check.sh)
    python benchmarks/paper_scale.py --device cpu --quick --out DIR     # tiny shapes: the same code path

Writes DIR/paper_scale.json and prints a markdown summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from multimoe import MultiTenantMixtralConfig, MultiTenantMixtralForCausalLM

# mistralai/Mixtral-8x7B-v0.1
MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=4096)
QUICK = dict(MIXTRAL_8X7B, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
GB = 1e9


def arithmetic_bytes(config: MixtralConfig, tenants: int, itemsize: int) -> tuple[int, int]:
    """(all layers' experts, one tenant's own layers) in bytes, counted from the shape."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = hidden // config.num_attention_heads
    experts = layers * config.num_local_experts * 3 * hidden * config.intermediate_size
    attention = 2 * hidden * hidden + 2 * hidden * config.num_key_value_heads * head_dim
    own = layers * (attention + config.num_local_experts * hidden + 2 * hidden) + 2 * config.vocab_size * hidden + hidden
    return experts * itemsize, own * itemsize


def multi_tenant(fields: dict, tenants: int, device: str, dtype: torch.dtype) -> MultiTenantMixtralForCausalLM:
    """`tenants` tenants reading one pool of the model's experts (identity maps), built on `device`."""
    layers, experts = fields["num_hidden_layers"], fields["num_local_experts"]
    specs = {f"t{index}": {"expert_map": [list(range(experts))] * layers, "tie_word_embeddings": False}
             for index in range(tenants)}
    config = MultiTenantMixtralConfig(**fields, tenants=specs, default_tenant="t0", pool_sizes=[experts] * layers)
    with torch.device(device):
        return MultiTenantMixtralForCausalLM._from_config(config, dtype=dtype).eval()


def plain(fields: dict, device: str, dtype: torch.dtype) -> MixtralForCausalLM:
    with torch.device(device):
        return MixtralForCausalLM._from_config(MixtralConfig(**fields), dtype=dtype).eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def decode_rates(models: dict, steps: int, device: str, prompt_length: int = 16) -> dict[str, float]:
    """Tokens/s of each `{label: (model, batch size, forward options)}`, decode steps interleaved."""
    states = {}
    for label, (model, rows, options) in models.items():
        prompt = torch.randint(3, model.config.vocab_size, (rows, prompt_length), device=device,
                               generator=torch.Generator(device).manual_seed(0))
        out = model(prompt, use_cache=True, **options)
        states[label] = [out.logits[:, -1:].argmax(-1), out.cache]
    times = {label: [] for label in models}
    for step in range(steps):
        for label in (list(models) if step % 2 else list(models)[::-1]):
            model, rows, options = models[label]
            token, cache = states[label]
            synchronize(device)
            start = time.perf_counter()
            out = model(token, cache=cache, use_cache=True, **options)
            states[label][0] = out.logits[:, -1:].argmax(-1)
            synchronize(device)
            if step >= 2:
                times[label].append(time.perf_counter() - start)
    return {label: models[label][1] / statistics.median(times[label]) for label in models}


def device_bytes(device: str) -> int | None:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else None


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a dry run of the code path)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fields, dtype = (QUICK if args.quick else MIXTRAL_8X7B), getattr(torch, args.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    experts_bytes, own_bytes = arithmetic_bytes(MixtralConfig(**fields), args.tenants, itemsize)
    result = {"shape": fields, "dtype": args.dtype, "device": args.device, "tenants": args.tenants}
    started = time.perf_counter()

    model = multi_tenant(fields, args.tenants, args.device, dtype)
    report = model.memory_report()
    result["memory"] = {
        "parameters_gb": report.total_bytes / GB,
        "on_device_gb": (device_bytes(args.device) or 0) / GB or None,
        "arithmetic_gb": (experts_bytes + args.tenants * own_bytes) / GB,
        "experts_gb": experts_bytes / GB,
        "per_tenant_gb": own_bytes / GB,
        "built_in_s": time.perf_counter() - started,
    }
    rows = args.tenants
    rates = decode_rates({
        "mixed": (model, rows, {"tenant_ids": torch.arange(rows, device=args.device) % args.tenants}),
        "one tenant": (model, rows, {"tenant": "t0"}),
    }, args.steps, args.device)
    result["mixed_vs_one_tenant"] = {**rates, "ratio": rates["mixed"] / rates["one tenant"], "batch": rows}
    del model
    free(args.device)

    single = {}
    for label, build in (("multimoe, 1 tenant", lambda: multi_tenant(fields, 1, args.device, dtype)),
                         ("MixtralForCausalLM", lambda: plain(fields, args.device, dtype))):
        model = build()
        options = {"tenant": "t0"} if label.startswith("multimoe") else {}
        single[label] = decode_rates({label: (model, 1, options)}, args.steps, args.device)[label]
        del model
        free(args.device)
    result["one_tenant_vs_plain"] = {**single, "ratio": single["multimoe, 1 tenant"] / single["MixtralForCausalLM"]}
    result["seconds"] = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper_scale.json").write_text(json.dumps(result, indent=2))
    memory, mixed, alone = result["memory"], result["mixed_vs_one_tenant"], result["one_tenant_vs_plain"]
    measured = memory["on_device_gb"]
    print(f"paper-scale check ({'quick shapes' if args.quick else 'Mixtral-8x7B'}, {args.tenants} tenants, {args.dtype}, "
          f"{args.device}, {result['seconds']:.0f} s)")
    print(f"- memory: {memory['parameters_gb']:.4g} GB of parameters"
          + (f", {measured:.4g} GB allocated on the device" if measured else "")
          + f"; arithmetic {memory['experts_gb']:.4g} + {memory['per_tenant_gb']:.4g} x {args.tenants} = "
          f"{memory['arithmetic_gb']:.4g} GB")
    print(f"- decode, batch {rows}: {args.tenants}-tenant mixed {mixed['mixed']:.1f} tok/s, one tenant "
          f"{mixed['one tenant']:.1f} tok/s, ratio {mixed['ratio']:.3f} (goal >= 0.90)")
    print(f"- decode, batch 1: multimoe 1 tenant {alone['multimoe, 1 tenant']:.1f} tok/s, MixtralForCausalLM "
          f"{alone['MixtralForCausalLM']:.1f} tok/s, ratio {alone['ratio']:.3f} (goal >= 0.98; measured one after "
          "the other, freeing memory between)")


if __name__ == "__main__":
    main()
