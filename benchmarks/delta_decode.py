"""Mixed-batch decode with per-tenant low-rank expert deltas against the same batch without them.

Both models hold the same pool (every tenant's experts merged into the first tenant's) and the same
tenants; one adds each merged expert's delta of `--rank` (`consolidate(delta_rank=...)`). A batch
with one row per tenant (or more, round-robin) decodes greedily one step at a time, the two models'
steps interleaved so that machine noise hits both alike; rates use the median step.

    python benchmarks/delta_decode.py                 # defaults used for docs/benchmarks.md
    python benchmarks/delta_decode.py --rank 32 --batch 16
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from model_overhead import Decoder, add_shape_arguments, tenants_of

from multimoe import consolidate

GOAL = 0.85


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    torch.manual_seed(0)
    tenants = tenants_of(args)
    everything = dict(threshold=math.inf, merge="keep_anchor", progress=False)
    plain = consolidate(tenants, **everything).eval()
    corrected = {rank: consolidate(tenants, **everything, delta_rank=rank).eval() for rank in args.ranks}
    names = list(tenants)
    del tenants
    print(
        f"decode  layers={args.layers} hidden={args.hidden} intermediate={args.intermediate} experts=8 top-2 "
        f"tenants={len(names)} pool={plain.config.pool_sizes[0]}/layer, every tenant's rows in every batch"
    )
    print("| rank | delta MiB | batch | without deltas (tokens/s) | with deltas (tokens/s) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rank, model in corrected.items():
        for batch in args.batches:
            rows = [names[row % len(names)] for row in range(batch)]
            prompt = torch.randint(3, 1000, (batch, 16))
            steps = {"plain": [], "deltas": []}
            with torch.inference_mode():
                for _ in range(args.repeats):
                    decoders = {
                        "plain": Decoder(TenantRows(plain, rows), prompt),
                        "deltas": Decoder(TenantRows(model, rows), prompt),
                    }
                    for step in range(args.new_tokens):
                        order = ("plain", "deltas") if step % 2 else ("deltas", "plain")
                        times = {name: decoders[name].step_seconds() for name in order}
                        if step >= 4:
                            for name, seconds in times.items():
                                steps[name].append(seconds)
            plain_rate = batch / statistics.median(steps["plain"])
            delta_rate = batch / statistics.median(steps["deltas"])
            mib = model.memory_report().delta_bytes / 2**20
            print(f"| {rank} | {mib:.1f} | {batch} | {plain_rate:.1f} | {delta_rate:.1f} | {delta_rate / plain_rate:.3f} |")
    print(f"goal: ratio >= {GOAL}")


class TenantRows:
    """A model called with one tenant per row, as `Decoder` calls a plain model."""

    def __init__(self, model, rows: list[str]):
        self.model, self.rows = model, rows

    def __call__(self, *args, **kwargs):
        return self.model(*args, tenant_names=self.rows, **kwargs)


if __name__ == "__main__":
    main()
