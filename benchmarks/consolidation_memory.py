"""Peak memory and time of consolidating 4 tenants from disk, relative to one source checkpoint.

Writes 4 Mixtral tenants (legacy per-expert safetensors, as transformers v5 saves them) to a
temporary directory, then runs `consolidate(..., memory_budget="1.25x")` in a fresh process while
a thread samples that process's resident memory every 5 ms. Holding the 4 sources in memory would take 4 checkpoints; the lazy
reader should need about the result plus one layer of every tenant.

    python benchmarks/consolidation_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import psutil
import torch
from multimoe import consolidate

process = psutil.Process()
baseline = process.memory_info().rss
peak, done = [baseline], threading.Event()

def sample():  # ru_maxrss would keep the import-time high-water mark; sample the live RSS instead
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.005)

sampler = threading.Thread(target=sample, daemon=True)  # a failed consolidation must not leave the process running
sampler.start()
sources = json.loads(sys.argv[1])
start = time.perf_counter()
model = consolidate(sources, memory_budget=sys.argv[2], progress=False)
seconds = time.perf_counter() - start
done.set()
sampler.join()
print(json.dumps(dict(baseline=baseline, peak=peak[0], seconds=seconds, result=model.memory_report().total_bytes,
                      pool_sizes=model.config.pool_sizes)))
"""

def write_tenants(root: Path, layers: int, hidden: int, intermediate: int, count: int) -> dict[str, str]:
    from multimoe.testing import fine_tune, random_mixtral, tiny_mixtral_config

    config = tiny_mixtral_config(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                                 num_local_experts=8, num_attention_heads=8, num_key_value_heads=4, vocab_size=1024)
    base = random_mixtral(config, seed=0)
    sources = {}
    for index in range(count):
        changed = [e for e in range(8) if e % 2 == index % 2] if index else []
        tenant = fine_tune(base, seed=index, changed_experts=changed, scale=0.01) if index else base
        tenant.save_pretrained(root / f"t{index}")
        sources[f"t{index}"] = str(root / f"t{index}")
        del tenant
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--memory-budget", default="1.25x")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        sources = write_tenants(Path(directory), args.layers, args.hidden, args.intermediate, args.tenants)
        checkpoint = sum(p.stat().st_size for p in Path(sources["t0"]).glob("*.safetensors"))
        child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sources), args.memory_budget],
                               capture_output=True, text=True, check=True)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    mib = 2**20
    used = result["peak"] - result["baseline"]
    print(f"{args.tenants} tenants, {args.layers} layers, H={args.hidden}, I={args.intermediate}, 8 experts; "
          f"memory_budget={args.memory_budget}; pool sizes {result['pool_sizes']}")
    print(f"  one source checkpoint            {checkpoint / mib:9.1f} MiB")
    print(f"  consolidated model               {result['result'] / mib:9.1f} MiB")
    print(f"  RSS before consolidating         {result['baseline'] / mib:9.1f} MiB   (Python, torch, transformers)")
    print(f"  peak RSS while consolidating     {result['peak'] / mib:9.1f} MiB")
    print(f"  peak RSS / one checkpoint        {result['peak'] / checkpoint:9.2f}")
    print(f"  (peak - before) / one checkpoint {used / checkpoint:9.2f}   "
          f"(result alone: {result['result'] / checkpoint:.2f}; all {args.tenants} sources: {args.tenants:.2f})")
    print(f"  consolidation time               {result['seconds']:9.1f} s")


if __name__ == "__main__":
    main()
