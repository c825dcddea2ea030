"""What giving loaded weights aligned storage costs at load time, and what it does to decode speed
(see `multimoe.alignment`).

Saves a multi-tenant model, then loads it repeatedly in fresh processes, alternating
`from_pretrained` as shipped with the same load minus the copy (`realign` replaced by a no-op),
so machine noise hits both alike. Reports the median load time of each, the bytes left
unaligned, the peak RSS growth of each load, and greedy one-tenant decode speed with the KV cache
(median step after a warm-up) of the model just loaded.

    python benchmarks/load_cost.py             # the figures in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from multimoe import MultiTenantMixtralForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from model_overhead import add_shape_arguments, tenants_of  # noqa: E402

LOAD = r"""
import json, sys, threading, time
import psutil
import multimoe.checkpoints
from multimoe import MultiTenantMixtralForCausalLM
from multimoe.alignment import ALIGNMENT

directory, copy = sys.argv[1], sys.argv[2] == "copy"
unaligned = []
if not copy:
    multimoe.checkpoints.realign = lambda model: None
process = psutil.Process()
before, peak, done = process.memory_info().rss, [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.001)

sampler = threading.Thread(target=sample)
sampler.start()
start = time.perf_counter()
model = MultiTenantMixtralForCausalLM.from_pretrained(directory)
seconds = time.perf_counter() - start
done.set()
sampler.join()
unaligned = sum(p.numel() * p.element_size() for p in model.parameters() if p.data_ptr() % ALIGNMENT)
growth = max(peak[0], process.memory_info().rss) - before

import statistics, torch
from transformers import DynamicCache
model.eval()
steps = []
with torch.inference_mode():
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.arange(1, 9)[None], cache=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(int(sys.argv[3])):
        start = time.perf_counter()
        out = model(input_ids=token, cache=cache, use_cache=True)
        steps.append(time.perf_counter() - start)
        token = out.logits[:, -1:].argmax(-1)
print(json.dumps({"seconds": seconds, "peak_growth": growth, "unaligned_bytes": unaligned,
                  "tokens_per_s": 1 / statistics.median(steps[2:])}))
"""


def load(directory: Path, copy: bool, decode_steps: int) -> dict:
    arguments = [str(directory), "copy" if copy else "plain", str(decode_steps)]
    result = subprocess.run([sys.executable, "-c", LOAD, *arguments], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser, layers=4, hidden=1024, intermediate=3584)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=24)
    args = parser.parse_args()
    model = MultiTenantMixtralForCausalLM.from_models(tenants_of(args))
    size = model.memory_report().total_bytes
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        runs = {True: [], False: []}
        for _ in range(args.repeats):
            for copy in (False, True):
                runs[copy].append(load(Path(folder), copy, args.decode_steps))
    mib = 2**20
    print(f"model: {size / mib:.0f} MiB ({args.tenants} tenants, {args.layers} layers, H={args.hidden}, "
          f"I={args.intermediate}); median of {args.repeats} loads each, alternating")
    print("| load | seconds | peak RSS growth (MiB) | unaligned after load (MiB) | decode tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for copy, label in ((False, "without the copy"), (True, "with the copy (shipped)")):
        seconds, growth, unaligned, speed = (
            statistics.median(run[key] for run in runs[copy])
            for key in ("seconds", "peak_growth", "unaligned_bytes", "tokens_per_s")
        )
        print(f"| {label} | {seconds:.3f} | {growth / mib:.0f} | {unaligned / mib:.0f} | {speed:.1f} |")


if __name__ == "__main__":
    main()
