"""Memory per rank of N tenants of Mixtral-8x7B and Mixtral-8x22B split over 1, 2, 4 and 8 GPUs by
tensor parallelism (`DistributedConfig(tp_plan="auto")`), from the real configs on the meta device.

Each model is built on the meta device (no memory, no download: the configs' fields are written out
below), and each of its tensors is counted as `memory_report` counts them (bytes of every
parameter and buffer, bfloat16), divided as the model's own tensor-parallel plan divides it: a
tensor its plan splits (`colwise`, `rowwise`, `packed_colwise`, `embedding_rowwise`, ...) holds
ceil(1/g) of its split dimension on each of g ranks, any other (norms, routers, expert maps) is
whole on every rank. An expert-parallel split (`ep_size=g`) holds P/g whole entries of each pool
instead of 1/g of every entry: the same bytes where P divides by g, as the pools here do.

The tenants share one pool of the model's 8 experts per layer (consolidation at `memory_budget=1.0`,
the paper's setting; a lossless pool of N different fine-tunes holds up to 8N entries, see
`--pool-entries`). A plain `MixtralForCausalLM` under the same plan is the reference row.

    python benchmarks/distributed_memory.py            # the tables in docs/distributed.md
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from multimoe import MultiTenantMixtralConfig, MultiTenantMixtralForCausalLM

# The shape fields of mistralai/Mixtral-8x7B-v0.1 and mistralai/Mixtral-8x22B-v0.1 (config.json).
MODELS = {
    "Mixtral-8x7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=32768),
    "Mixtral-8x22B": dict(vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                          num_attention_heads=48, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                          max_position_embeddings=65536),
}
SPLIT_STYLES = {"colwise", "rowwise", "packed_colwise", "colwise_gather_output", "rowwise_split_input",
                "embedding_rowwise", "packed_rowwise"}
# The dimension each style splits: a Linear's output rows (dim 0 of [out, in]) or input features (-1);
# the fused experts' gate/up rows (-2 of [E, 2I, H]) or down inputs (-1 of [E, H, I]); a vocabulary (0).
SPLIT_DIM = {"rowwise": -1, "rowwise_split_input": -1, "packed_colwise": -2, "packed_rowwise": -1}
GB = 1e9


def multi_tenant(fields: dict, tenants: int, entries: int) -> MultiTenantMixtralForCausalLM:
    layers, experts = fields["num_hidden_layers"], fields["num_local_experts"]
    specs = {f"t{index}": {"expert_map": [[entry % entries for entry in range(index, index + experts)]] * layers,
                           "tie_word_embeddings": False} for index in range(tenants)}
    config = MultiTenantMixtralConfig(**fields, tenants=specs, default_tenant="t0", pool_sizes=[entries] * layers)
    with torch.device("meta"):
        return MultiTenantMixtralForCausalLM._from_config(config, dtype=torch.bfloat16)


def plain(fields: dict) -> MixtralForCausalLM:
    with torch.device("meta"):
        return MixtralForCausalLM._from_config(MixtralConfig(**fields), dtype=torch.bfloat16)


def style_of(plan: dict[str, str], name: str) -> str | None:
    """The style `plan` gives tensor `name` (rules name a module or the tensor, layer numbers as `*`)."""
    generic = ".".join("*" if part.isdigit() else part for part in name.split("."))
    return plan.get(generic, plan.get(generic.rpartition(".")[0]))


def bytes_per_rank(model: torch.nn.Module, ranks: int) -> int:
    """What one of `ranks` tensor-parallel ranks holds of `model`'s tensors, in bytes."""
    plan, total = model.tp_plan, 0
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        style = style_of(plan, name) if ranks > 1 else None
        if style in SPLIT_STYLES:
            dim = SPLIT_DIM.get(style, 0) if tensor.dim() > 1 else 0  # a bias: its one dimension
            shape = list(tensor.shape)
            shape[dim] = math.ceil(shape[dim] / ranks)
            total += math.prod(shape) * tensor.element_size()
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", default="1,2,4,8")
    parser.add_argument("--gpus", default="1,2,4,8")
    parser.add_argument("--pool-entries", type=int, default=8, help="pool entries per layer (8: one model's experts)")
    args = parser.parse_args(argv)
    tenant_counts = [int(count) for count in args.tenants.split(",")]
    gpu_counts = [int(count) for count in args.gpus.split(",")]
    if args.pool_entries < 8 or min(tenant_counts + gpu_counts) < 1:
        parser.error("--pool-entries takes at least the model's 8 experts; --tenants and --gpus positive counts")
    for label, fields in MODELS.items():
        print(f"\n{label}, bfloat16, pool of {args.pool_entries} entries per layer: GB per rank")
        print("| model | " + " | ".join(f"{count} GPU{'s' * (count > 1)}" for count in gpu_counts) + " |")
        print("|---|" + "---:|" * len(gpu_counts))
        reference = plain(fields)
        print("| plain `MixtralForCausalLM` | "
              + " | ".join(f"{bytes_per_rank(reference, count) / GB:.1f}" for count in gpu_counts) + " |")
        for tenants in tenant_counts:
            model = multi_tenant(fields, tenants, args.pool_entries)
            print(f"| {tenants} tenant{'s' * (tenants > 1)} | "
                  + " | ".join(f"{bytes_per_rank(model, count) / GB:.1f}" for count in gpu_counts) + " |")


if __name__ == "__main__":
    main()
