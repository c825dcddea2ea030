"""Peak memory and time of consolidating 4 tenants from disk, relative to one source checkpoint.

Writes 4 Mixtral tenants (legacy per-expert safetensors, as transformers v5 saves them) to a
temporary directory, then runs `consolidate(..., memory_budget="1.25x")` in a fresh process while
a thread samples that process's resident memory every 5 ms. Holding the 4 sources in memory would take 4 checkpoints; the lazy
reader should need about the result plus one layer of every tenant.

`--similarity output` takes the calibration path (random token ids as calibration data): each
original tenant then runs one decoder layer at a time. Several `--layers` (and similarities) give
one row each, and the slope of the peak per added layer, to compare with the result's.

    python benchmarks/consolidation_memory.py
    python benchmarks/consolidation_memory.py --similarity weight_l2 output --layers 4 8 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = r"""
import json, sys, threading, time
import psutil
import torch
from multimoe import consolidate
from multimoe.consolidation import api

process = psutil.Process()
baseline = process.memory_info().rss
peak, calibration_peak, done, calibrating = [baseline], [None], threading.Event(), threading.Event()

def sample():  # ru_maxrss would keep the import-time high-water mark; sample the live RSS instead
    while not done.is_set():
        rss = process.memory_info().rss
        peak[0] = max(peak[0], rss)
        if calibrating.is_set():
            calibration_peak[0] = max(calibration_peak[0] or rss, rss)
        time.sleep(0.005)

calibration = api.collect

def collect(*args, **kwargs):  # consolidate's calibration: its own peak too
    calibrating.set()
    try:
        return calibration(*args, **kwargs)
    finally:
        calibrating.clear()

api.collect = collect
sampler = threading.Thread(target=sample, daemon=True)  # a failed consolidation must not leave the process running
sampler.start()
sources, options = json.loads(sys.argv[1]), json.loads(sys.argv[2])
start = time.perf_counter()
model = consolidate(sources, progress=False, **options)
seconds = time.perf_counter() - start
done.set()
sampler.join()
print(json.dumps(dict(baseline=baseline, peak=peak[0], calibration_peak=calibration_peak[0], seconds=seconds,
                      result=model.memory_report().total_bytes, pool_sizes=model.config.pool_sizes)))
"""
MIB = 2**20
VOCAB = 1024


def write_tenants(root: Path, layers: int, hidden: int, intermediate: int, count: int) -> tuple[dict[str, str], int]:
    """The tenants' directories, and the bytes of one decoder layer of one tenant."""
    from multimoe.testing import fine_tune, random_mixtral, tiny_mixtral_config

    config = tiny_mixtral_config(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                                 num_local_experts=8, num_attention_heads=8, num_key_value_heads=4, vocab_size=VOCAB)
    base = random_mixtral(config, seed=0)
    layer_bytes = sum(p.numel() * p.element_size() for p in base.model.layers[0].parameters())
    sources = {}
    for index in range(count):
        changed = [e for e in range(8) if e % 2 == index % 2] if index else []
        tenant = fine_tune(base, seed=index, changed_experts=changed, scale=0.01) if index else base
        tenant.save_pretrained(root / f"t{index}")
        sources[f"t{index}"] = str(root / f"t{index}")
        del tenant
    return sources, layer_bytes


def measure(sources: dict[str, str], options: dict) -> dict:
    """One consolidation in a fresh process: its RSS before, its peak, its time and the result's bytes."""
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sources), json.dumps(options)],
                           capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"The consolidation failed:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def options_for(similarity: str, memory_budget: str, calibration_rows: int, calibration_tokens: int) -> dict:
    """`consolidate`'s options; a calibrated similarity gets random token ids as calibration data."""
    options = dict(similarity=similarity, memory_budget=memory_budget)
    if similarity == "output":
        generator = torch.Generator().manual_seed(0)
        shape = (calibration_rows, calibration_tokens)
        options["calibration"] = torch.randint(4, VOCAB, shape, generator=generator).tolist()
    return options


def print_run(args, similarity: str, layers: int, checkpoint: int, result: dict) -> None:
    used = result["peak"] - result["baseline"]
    print(f"{args.tenants} tenants, {layers} layers, H={args.hidden}, I={args.intermediate}, 8 experts; "
          f"similarity={similarity}, memory_budget={args.memory_budget}; pool sizes {result['pool_sizes']}")
    print(f"  one source checkpoint            {checkpoint / MIB:9.1f} MiB")
    print(f"  consolidated model               {result['result'] / MIB:9.1f} MiB")
    print(f"  RSS before consolidating         {result['baseline'] / MIB:9.1f} MiB   (Python, torch, transformers)")
    print(f"  peak RSS while consolidating     {result['peak'] / MIB:9.1f} MiB")
    if result["calibration_peak"] is not None:
        print(f"  peak RSS while calibrating       {result['calibration_peak'] / MIB:9.1f} MiB")
    print(f"  peak RSS / one checkpoint        {result['peak'] / checkpoint:9.2f}")
    print(f"  (peak - before) / one checkpoint {used / checkpoint:9.2f}   "
          f"(result alone: {result['result'] / checkpoint:.2f}; all {args.tenants} sources: {args.tenants:.2f})")
    print(f"  consolidation time               {result['seconds']:9.1f} s")


def growth(row: dict, peak: str) -> float | None:
    """MiB the RSS rose above the baseline at its `peak` (None: no such phase)."""
    return None if row[peak] is None else (row[peak] - row["baseline"]) / MIB


def print_table(rows: list[dict]) -> None:
    """One row per (similarity, layers), then per similarity the slopes fitted over the layer counts."""
    print("\n| similarity | layers | one source checkpoint | result | one layer of all tenants | peak RSS growth "
          "| growth - result | calibration's peak growth | time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        total, calibration, result = growth(row, "peak"), growth(row, "calibration_peak"), row["result"] / MIB
        sizes = (row["checkpoint"] / MIB, result, row["layer_of_all"] / MIB, total, total - result, calibration)
        cells = [row["similarity"], row["layers"], *("-" if size is None else f"{size:.1f} MiB" for size in sizes),
                 f"{row['seconds']:.1f} s"]
        print("| " + " | ".join(map(str, cells)) + " |")
    for similarity in dict.fromkeys(row["similarity"] for row in rows):
        runs = [row for row in rows if row["similarity"] == similarity]
        if len(runs) < 2:
            continue
        layers = [row["layers"] for row in runs]
        slopes = {"peak RSS growth": [growth(row, "peak") for row in runs],
                  "calibration's peak growth": [growth(row, "calibration_peak") for row in runs],
                  "result": [row["result"] / MIB for row in runs]}
        fitted = [f"{name} {statistics.linear_regression(layers, values).slope:.1f}"
                  for name, values in slopes.items() if None not in values]
        print(f"\n{similarity}, MiB per added layer: {'; '.join(fitted)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--memory-budget", default="1.25x")
    parser.add_argument("--similarity", nargs="+", default=["weight_l2"],
                        choices=["weight_l2", "weight_cosine", "output"])
    parser.add_argument("--calibration-rows", type=int, default=32,
                        help="random calibration rows (--similarity output)")
    parser.add_argument("--calibration-tokens", type=int, default=64, help="tokens per calibration row")
    args = parser.parse_args()
    rows = []
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as directory:
            sources, layer_bytes = write_tenants(Path(directory), layers, args.hidden, args.intermediate, args.tenants)
            checkpoint = sum(p.stat().st_size for p in Path(sources["t0"]).glob("*.safetensors"))
            for similarity in args.similarity:
                options = options_for(similarity, args.memory_budget, args.calibration_rows, args.calibration_tokens)
                result = measure(sources, options)
                print_run(args, similarity, layers, checkpoint, result)
                rows.append(result | dict(similarity=similarity, layers=layers, checkpoint=checkpoint,
                                          layer_of_all=layer_bytes * args.tenants))
    if len(rows) > 1:
        print_table(sorted(rows, key=lambda row: (row["similarity"], row["layers"])))


if __name__ == "__main__":
    main()
