"""What giving loaded weights aligned storage costs at load time (see `multimoe.alignment`).

Saves a multi-tenant model, then loads it repeatedly in fresh processes, alternating
`from_pretrained` as shipped with the same load minus the copy (`realign` replaced by a no-op),
so machine noise hits both alike. Reports the median load time of each, the bytes copied, and
the peak RSS growth of each load.

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
from model_overhead import fine_tunes, mixtral  # noqa: E402

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
print(json.dumps({"seconds": seconds, "peak_growth": max(peak[0], process.memory_info().rss) - before,
                  "unaligned_bytes": unaligned}))
"""


def load(directory: Path, copy: bool) -> dict:
    result = subprocess.run([sys.executable, "-c", LOAD, str(directory), "copy" if copy else "plain"],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = MultiTenantMixtralForCausalLM.from_models(
        fine_tunes(mixtral(args.layers, args.hidden, args.intermediate), args.tenants)
    )
    size = model.memory_report().total_bytes
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        runs = {True: [], False: []}
        for _ in range(args.repeats):
            for copy in (False, True):
                runs[copy].append(load(Path(folder), copy))
    mib = 2**20
    print(f"model: {size / mib:.0f} MiB ({args.tenants} tenants, {args.layers} layers, H={args.hidden}, "
          f"I={args.intermediate}); median of {args.repeats} loads each, alternating")
    print("| load | seconds | peak RSS growth (MiB) | unaligned after load (MiB) |")
    print("|---|---:|---:|---:|")
    for copy, label in ((False, "without the copy"), (True, "with the copy (shipped)")):
        seconds = statistics.median(run["seconds"] for run in runs[copy])
        growth = statistics.median(run["peak_growth"] for run in runs[copy])
        unaligned = statistics.median(run["unaligned_bytes"] for run in runs[copy])
        print(f"| {label} | {seconds:.3f} | {growth / mib:.0f} | {unaligned / mib:.0f} |")


if __name__ == "__main__":
    main()
