"""Does a pool call pay for the entries no row routes to? One sparse layer's decode call, timed
for each experts implementation transformers offers and for multimoe's CPU call on the routed
window of entries (`multimoe.pool_window`), at pool sizes 8, 20 and 32.

A decode step of 8 rows, top-2, routes 16 (token, expert) pairs. The rows of one tenant reach at
most its 8 experts, which the lossless assembly lays out first for the first tenant: here the
rows reach entries 0..7 (or 0..11, as the rows of several tenants reach more). The pool is the
family's experts class, so the candidates are transformers' `grouped_mm` (the default: one grouped
product, offsets per entry), `batched_mm` (one product per routed pair) and `eager` (the family's
own loop over the entries some row routes to, and only those), and `grouped_mm` on the window of
entries the rows reach. If the whole pool of 32 cost more than one of 8 at the same routing, the
empty entries would be the cost.

    python benchmarks/pool_calls.py                       # the figures in docs/benchmarks.md
    python benchmarks/pool_calls.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from multimoe.pool_window import call_pool
from timing import seconds

IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")  # transformers'; then the routed window
CANDIDATES = (*IMPLEMENTATIONS, "grouped_mm, routed window")


def pool(hidden: int, intermediate: int, entries: int, implementation: str, device: str, dtype: torch.dtype):
    config = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=entries)
    config._experts_implementation = implementation.split(",")[0]
    experts = MixtralExperts(config).to(device, dtype)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_(0, 0.02, generator=torch.Generator(device).manual_seed(0))
    return experts


def routing(reached: int, rows: int, device: str, dtype: torch.dtype):
    """`rows` tokens, top-2 over entries 0..reached-1 (seeded), as a sparse block passes them."""
    generator = torch.Generator().manual_seed(reached)
    index = torch.stack([torch.randperm(reached, generator=generator)[:2] for _ in range(rows)])
    weights = torch.softmax(torch.randn(rows, 2, generator=generator), dim=-1)
    return index.to(device), weights.to(device, dtype)


def time_call(function, repeats: int, device: str) -> float:
    """Median microseconds of `function()` over `repeats` calls, after warm-up."""
    for _ in range(5):
        function()
    return statistics.median(seconds(function, device) for _ in range(repeats)) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="256x512,1024x3584", help="hidden x intermediate, comma separated")
    parser.add_argument("--pool-sizes", default="8,20,32")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeats < 1:
        parser.error("--rows and --repeats must be positive")
    if any(size < 8 for size in (int(size) for size in args.pool_sizes.split(","))):
        parser.error("--pool-sizes: a pool holds at least one tenant's 8 experts")
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(part) for part in shape.split("x")) for shape in args.shapes.split(",")]
    sizes = [int(size) for size in args.pool_sizes.split(",")]
    print(f"device {args.device}, {args.dtype}, {torch.get_num_threads()} threads; {args.rows} rows top-2; "
          "median us per call")
    print("| shape | entries reached | pool entries | " + " | ".join(CANDIDATES) + " |")
    print("|---|---:|---:|" + "---:|" * len(CANDIDATES))
    with torch.no_grad():
        for hidden, intermediate in shapes:
            inputs = torch.randn(args.rows, hidden, generator=torch.Generator().manual_seed(1)).to(args.device, dtype)
            for reached in (8, 12):  # one tenant's rows; several tenants' rows
                for size in sizes:
                    if reached > size:
                        continue
                    index, weights = routing(reached, args.rows, args.device, dtype)
                    cells = []
                    for name in CANDIDATES:
                        experts = pool(hidden, intermediate, size, name, args.device, dtype)
                        call = experts if name in IMPLEMENTATIONS else partial(call_pool, experts)
                        cells.append(time_call(partial(call, inputs, index, weights), args.repeats, args.device))
                    print(f"| H={hidden}, I={intermediate} | {reached} | {size} | "
                          + " | ".join(f"{cell:.0f}" for cell in cells) + " |")

if __name__ == "__main__":
    main()
