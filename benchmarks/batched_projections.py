"""One projection of a mixed batch: one product per tenant group against one batched product over
the tenants' weights laid side by side (`multimoe.batched_projections`), timed alternately in one run.

    python benchmarks/batched_projections.py                  # the figures in docs/benchmarks.md
    python benchmarks/batched_projections.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from multimoe.batched_projections import batched_linear, lay_side_by_side
from timing import seconds


def compare(width: int, tenants: int, rows: int, repeats: int, device: str, dtype: torch.dtype) -> tuple[float, float]:
    """Median microseconds of the per-group loop and of the batched product, for `tenants` groups of
    `rows` rows through a [width, width] projection each."""
    linears = [nn.Linear(width, width, bias=False).to(device, dtype) for _ in range(tenants)]
    lay_side_by_side([linear.weight for linear in linears])
    weights, biases = [linear.weight for linear in linears], [None] * tenants
    inputs = torch.randn(tenants * rows, width, device=device, dtype=dtype)
    sizes = [rows] * tenants

    def per_group():
        return torch.cat([F.linear(part, weight) for part, weight in zip(inputs.split(sizes), weights)])

    def batched():
        return batched_linear(inputs, sizes, weights, biases)

    torch.testing.assert_close(batched(), per_group(), rtol=1e-3, atol=1e-3)  # the same product
    loop_times, batched_times = [], []
    with torch.no_grad():
        for _ in range(5):
            per_group(), batched()
        for index in range(repeats):  # alternate which goes first, so noise hits both alike
            if index % 2:
                loop_times.append(seconds(per_group, device))
                batched_times.append(seconds(batched, device))
            else:
                batched_times.append(seconds(batched, device))
                loop_times.append(seconds(per_group, device))
    return statistics.median(loop_times) * 1e6, statistics.median(batched_times) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="256,1024,4096")
    parser.add_argument("--tenants", default="4,8")
    parser.add_argument("--rows", default="1,2,8", help="rows per tenant group")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    numbers = {key: [int(part) for part in getattr(args, key).split(",")] for key in ("widths", "tenants", "rows")}
    if args.repeats < 1 or min(min(values) for values in numbers.values()) < 1:
        parser.error("--widths, --tenants, --rows and --repeats take positive integers")
    dtype = getattr(torch, args.dtype)
    print(f"device {args.device}, {args.dtype}, {torch.get_num_threads()} threads; median us per projection")
    print("| projection | tenant groups x rows | one product per group | one batched product | speed-up |")
    print("|---|---|---:|---:|---:|")
    for width in numbers["widths"]:
        for tenants in numbers["tenants"]:
            for rows in numbers["rows"]:
                loop, batched = compare(width, tenants, rows, args.repeats, args.device, dtype)
                print(f"| {width} x {width} | {tenants} x {rows} | {loop:.0f} | {batched:.0f} | {loop / batched:.2f}x |")


if __name__ == "__main__":
    main()
