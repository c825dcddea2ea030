"""What the multi-tenant class costs over plain Mixtral, measured side by side in one run.

1. Decode tokens/s of `MultiTenantMixtralForCausalLM` (N tenants held, one active) divided by a
   plain `MixtralForCausalLM` with the same weights. Single greedy decode steps (KV cache on) of
   the two models are interleaved, so machine noise hits both alike; rates use the median step.
2. `set_active_model` latency in microseconds for a small and a large model: it only rebinds a
   name, so it should not grow with depth or width.

    python benchmarks/model_overhead.py            # defaults used for docs/benchmarks.md
    python benchmarks/model_overhead.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from multimoe import MultiTenantMixtralForCausalLM
from multimoe.testing import fine_tune


def mixtral(layers: int, hidden: int, intermediate: int, vocab: int = 1024) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
    )
    return MixtralForCausalLM(config).eval()


def fine_tunes(base: MixtralForCausalLM, count: int) -> dict[str, MixtralForCausalLM]:
    """`base` and `count - 1` stand-in fine-tunes, each moving half of the experts."""
    experts = range(base.config.num_local_experts)
    tenants = {"t0": base}
    for index in range(1, count):
        changed = [expert for expert in experts if expert % 2 == index % 2]
        tenants[f"t{index}"] = fine_tune(base, seed=index, changed_experts=changed, scale=0.01)
    return tenants


def add_shape_arguments(
    parser, *, layers: int = 8, hidden: int = 512, intermediate: int = 1024, tenants: int = 4
) -> None:
    """The shape of the benchmark's Mixtral and how many tenants hold it (`tenants_of`)."""
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--intermediate", type=int, default=intermediate)
    parser.add_argument("--tenants", type=int, default=tenants)


def tenants_of(args) -> dict[str, MixtralForCausalLM]:
    """The tenants `add_shape_arguments` describes: a random base and its stand-in fine-tunes."""
    return fine_tunes(mixtral(args.layers, args.hidden, args.intermediate), args.tenants)


class Decoder:
    """Greedy decoding one step at a time with a KV cache, so two models can be interleaved."""

    def __init__(self, model, prompt: torch.Tensor):
        self.model = model
        out = model(prompt, use_cache=True)
        self.cache = out.cache
        self.token = out.logits[:, -1:].argmax(-1)

    def step_seconds(self) -> float:
        synchronize = torch.cuda.synchronize if self.token.device.type == "cuda" else (lambda: None)
        synchronize()
        start = time.perf_counter()
        out = self.model(self.token, cache=self.cache, use_cache=True)
        self.token = out.logits[:, -1:].argmax(-1)
        synchronize()
        return time.perf_counter() - start


def decode_ratio(args) -> None:
    torch.manual_seed(0)
    base = mixtral(args.layers, args.hidden, args.intermediate)
    tenants = fine_tunes(base, args.tenants)
    dtype = getattr(torch, args.dtype)
    multi = MultiTenantMixtralForCausalLM.from_models(tenants).eval().to(args.device, dtype)
    multi.set_active_model("t0")
    plain = base.to(args.device, dtype)
    del tenants
    prompt = torch.randint(3, 1000, (args.batch, 16), device=args.device)
    assert torch.equal(
        plain.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0),
        multi.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0),
    ), "the multi-tenant model must generate the same tokens before its speed means anything"
    plain_steps, multi_steps = [], []
    with torch.inference_mode():
        for _ in range(args.repeats):
            decoders = Decoder(plain, prompt), Decoder(multi, prompt)
            for step in range(args.new_tokens):
                # Interleave single steps, alternating which model goes first, so machine noise
                # hits both alike; the first steps of each sequence are warm-up.
                first, second = decoders if step % 2 else decoders[::-1]
                times = first.step_seconds(), second.step_seconds()
                if step >= 4:
                    plain_time, multi_time = times if step % 2 else times[::-1]
                    plain_steps.append(plain_time)
                    multi_steps.append(multi_time)
    plain_rate = args.batch / statistics.median(plain_steps)
    multi_rate = args.batch / statistics.median(multi_steps)
    print(
        f"decode  layers={args.layers} hidden={args.hidden} intermediate={args.intermediate} experts=8 top-2 "
        f"tenants held={args.tenants} pool={multi.config.pool_sizes[0]}/layer batch={args.batch} "
        f"steps={len(plain_steps)} device={args.device} dtype={args.dtype}"
    )
    print(f"  plain MixtralForCausalLM      {plain_rate:9.1f} tokens/s (median step)")
    print(f"  MultiTenantMixtralForCausalLM {multi_rate:9.1f} tokens/s")
    print(f"  ratio multi/plain: {multi_rate / plain_rate:.3f}  (goal >= 0.97)")


def switch_latency(sizes: list[tuple[int, int, int]], switches: int) -> list[tuple[float, float, int]]:
    """Mean and p99 microseconds per switch for each size; sizes are measured in alternating rounds."""
    torch.manual_seed(0)
    models = [MultiTenantMixtralForCausalLM.from_models(fine_tunes(mixtral(*size), 2)) for size in sizes]
    samples = [[] for _ in sizes]
    rounds = 20
    for _ in range(rounds):
        for model, timings in zip(models, samples):
            for index in range(switches // rounds):
                name = "t1" if index % 2 else "t0"
                start = time.perf_counter_ns()
                model.set_active_model(name)
                timings.append(time.perf_counter_ns() - start)
    results = []
    for model, timings in zip(models, samples):
        timings.sort()
        parameters = sum(p.numel() for p in model.parameters())
        results.append((statistics.mean(timings) / 1000, timings[int(0.99 * len(timings))] / 1000, parameters))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--switches", type=int, default=20000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--latency-sizes", nargs="+", default=[(2, 64), (24, 512)], metavar="LAYERSxHIDDEN",
                        type=lambda text: tuple(int(part) for part in text.split("x")),
                        help="model sizes whose set_active_model latency is compared (default 2x64 24x512)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    decode_ratio(args)
    print("set_active_model latency (two tenants held)")
    sizes = [(layers, hidden, 2 * hidden) for layers, hidden in args.latency_sizes]
    for (layers, hidden, _), (mean_us, p99_us, parameters) in zip(sizes, switch_latency(sizes, args.switches)):
        print(
            f"  layers={layers:2d} hidden={hidden:4d} params={parameters / 1e6:7.1f}M   "
            f"mean {mean_us:6.2f} us   p99 {p99_us:6.2f} us   (goal < 100 us, flat across sizes)"
        )


if __name__ == "__main__":
    main()
