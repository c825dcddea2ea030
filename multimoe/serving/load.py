"""A bounded load test over HTTP: `multimoe serve` against one `transformers serve` per tenant.

    python -m multimoe.serving.load                   # both systems, the same requests, side by side
    python -m multimoe.serving.load --flood           # one tenant sends most of the requests
    python -m multimoe.serving.load --systems multimoe --requests 8 --clients 4
    python -m multimoe.serving.load --write-docs      # also rewrites its section of docs/benchmarks.md

It starts the servers itself, on 127.0.0.1 and free ports, as subprocesses in their own process
groups, waits until they answer, sends one fixed, seeded list of requests over the shipped
testbed's four task tenants from `--clients` concurrent streaming `openai` clients, and stops the
servers (SIGTERM, then SIGKILL) whatever happens: a failure, Ctrl-C, SIGTERM or `--timeout`. The
systems run one after the other:

- multimoe: one `multimoe serve --testbed` process, every tenant a model of it;
- transformers: the practical alternative, one `transformers serve --continuous-batching` process
  per tenant, pinned to the tenant's shipped directory (its checkpoint, tokenizer and chat template).

Each holds every client's request at once: multimoe's running batch (`--max-batch-size`), and each
transformers process's paged cache (`--cb-num-blocks`, `--cb-max-batch-tokens`; left to itself, on a
CPU, each process claims most of the machine's memory). Every server process gets `--threads`
torch threads (OMP_NUM_THREADS) on the cores this command may use.

Every request is a held-out task prompt, greedy, for exactly `--max-tokens` new tokens, so both
systems do the same work: multimoe takes vLLM's `ignore_eos`; `transformers serve` refuses that
field (422) but takes a per-request `generation_config`, and its continuous batching ignores EOS
for `eos_token_id: -1`. Tokens are counted from each answer's `usage`, not assumed.

Reported per system: errors and lost requests (no complete answer; the exit status is 1 unless both
are 0), wall time, completion tokens/s and requests/s, per-tenant p50/p99 time to first token (at
the first streamed text), the peak of the servers' summed resident memory while the load runs, and
the answers that differ from the first system's (greedy decoding of the same weights: 0 expected).
One untimed request per tenant warms each system up first (`transformers serve` builds its
continuous-batching cache at its first request).

Needs `multimoe[serve]`; the transformers side also `transformers[serving]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
from openai import DEFAULT_CONNECTION_LIMITS, APIError, DefaultHttpxClient, OpenAI
from transformers import AutoConfig

from .. import testbed
from ..validation import number_argument
from .bench import write_section

TENANTS = tuple(testbed.TASKS)  # add, reverse, sort, shift
SYSTEMS = ("multimoe", "transformers")
FLOOD_SHARE = 0.85  # of the requests, from the first tenant under --flood
STOP_TIMEOUT_S = 15  # after SIGTERM, before SIGKILL
MEMORY_INTERVAL_S = 0.05
DOCS_MARKERS = {
    False: ("<!-- serving-load:begin -->", "<!-- serving-load:end -->"),
    True: ("<!-- serving-load-flood:begin -->", "<!-- serving-load-flood:end -->"),
}


@dataclass(frozen=True)
class LoadRequest:
    index: int
    tenant: str
    prompt: str


@dataclass(frozen=True)
class Route:
    """Where one tenant's requests go on one system, and what they carry there to ignore EOS."""

    url: str
    model: str
    extra_body: dict


@dataclass
class Outcome:
    request: LoadRequest
    ttft_s: float | None = None
    text: str = ""
    tokens: int = 0
    finished: bool = False
    error: str | None = None


@dataclass
class Report:
    system: str
    processes: int
    outcomes: list[Outcome]
    wall_s: float
    peak_rss_bytes: int

    @property
    def errors(self) -> int:
        return sum(outcome.error is not None for outcome in self.outcomes)

    @property
    def lost(self) -> int:
        """Requests that neither failed nor got a complete answer (cut short, or never sent in time)."""
        return sum(outcome.error is None and not outcome.finished for outcome in self.outcomes)

    @property
    def completed(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.finished and outcome.error is None]

    @property
    def tokens(self) -> int:
        return sum(outcome.tokens for outcome in self.completed)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def ttfts(self, tenant: str) -> list[float]:
        return [o.ttft_s for o in self.completed if o.request.tenant == tenant and o.ttft_s is not None]


def testbed_context() -> int:
    """Tokens a testbed request may span, prompt and answer together."""
    return AutoConfig.from_pretrained(testbed.checkpoint(TENANTS[0])).max_position_embeddings


def request_list(count: int, seed: int, flood: bool = False) -> list[LoadRequest]:
    """`count` held-out prompts over the tenants, in a seeded order: evenly, or (`flood`) with the
    first tenant sending `FLOOD_SHARE` of them and every other tenant an equal part of the rest."""
    if flood:
        minor = max(1, round(count * (1 - FLOOD_SHARE) / (len(TENANTS) - 1)))
        counts = {tenant: minor for tenant in TENANTS[1:]} | {TENANTS[0]: count - minor * (len(TENANTS) - 1)}
    else:
        counts = {tenant: count // len(TENANTS) + (i < count % len(TENANTS)) for i, tenant in enumerate(TENANTS)}
    order = [tenant for tenant, n in counts.items() for _ in range(n)]
    random.Random(seed).shuffle(order)
    prompts = {tenant: iter(testbed.TASKS[tenant].held_out(n)) for tenant, n in counts.items()}
    return [LoadRequest(index, tenant, next(prompts[tenant]).prompt) for index, tenant in enumerate(order)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen
    log: Path
    url: str


class Servers:
    """Server subprocesses on 127.0.0.1, each in a process group of its own, all stopped (SIGTERM,
    then SIGKILL after `STOP_TIMEOUT_S`) when the `with` block is left, however it is left."""

    def __init__(self, logs: Path, threads: int):
        self.logs, self.threads = logs, threads
        self.servers: list[Server] = []

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc_info) -> None:
        for server in self.servers:
            self.signal(server.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for server in self.servers:
            try:
                server.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.signal(server.process, signal.SIGKILL)
                server.process.wait()

    @staticmethod
    def signal(process: subprocess.Popen, number: int) -> None:
        try:
            os.killpg(process.pid, number)
        except ProcessLookupError:  # already gone
            pass

    def start(self, name: str, module_and_arguments: list[str]) -> str:
        """Run `python -m ...` on a free loopback port; its base URL."""
        port = free_port()
        log = self.logs / f"{name}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", *module_and_arguments, "--host", "127.0.0.1", "--port", str(port)],
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": str(self.threads)},
            )
        self.servers.append(Server(process, log, f"http://127.0.0.1:{port}"))
        return self.servers[-1].url

    def wait_until_ready(self, deadline: float) -> None:
        """Until every server answers `/v1/models`; one that exits or is late fails with its log."""
        for server in self.servers:
            while True:
                try:
                    with urllib.request.urlopen(f"{server.url}/v1/models", timeout=2):
                        break
                except OSError:
                    if server.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{server.log.stem} did not start (exit status {server.process.poll()}); "
                                           f"its log ends:\n{server.log.read_text(errors='replace')[-3000:]}") from None
                    time.sleep(0.2)


def start_system(system: str, servers: Servers, clients: int, deadline: float) -> dict[str, Route]:
    """Start `system`'s servers; the route of every tenant, once all of them answer."""
    if system == "multimoe":
        url = servers.start("multimoe", ["multimoe.cli", "serve", "--testbed", "--max-batch-size", str(clients),
                                         "--shutdown-timeout", "5"])
        routes = {tenant: Route(url, tenant, {"ignore_eos": True}) for tenant in TENANTS}
    else:
        routes = {}
        for tenant in TENANTS:
            # By default, each process on a CPU sizes its paged cache to most of the machine's memory (four of
            # them meet the OOM killer): sized here, as multimoe's batch is, to hold every client's request
            # (blocks of 256 tokens, batches of `clients` whole contexts).
            directory = str(testbed.checkpoint(tenant))
            url = servers.start(f"transformers-{tenant}", [
                "transformers.cli.transformers", "serve", directory, "--continuous-batching", "--device", "cpu",
                "--cb-num-blocks", str(clients), "--cb-max-batch-tokens", str(clients * testbed_context())])
            routes[tenant] = Route(url, directory, {"generation_config": json.dumps({"eos_token_id": -1})})
    servers.wait_until_ready(deadline)
    return routes


class PeakMemory:
    """The peak of the summed resident memory of some processes and their children, sampled in a
    thread while the `with` block runs."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.peak_bytes = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def __enter__(self) -> PeakMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        self.thread.join()

    def watch(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self.resident_bytes())
            if self.done.wait(MEMORY_INTERVAL_S):
                return

    def resident_bytes(self) -> int:
        total = 0
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                family = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for process in family:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        return total


def send(client: OpenAI, route: Route, request: LoadRequest, max_tokens: int, deadline: float) -> Outcome:
    """One streamed completion; its time to first token is taken at the first chunk with text."""
    outcome = Outcome(request)
    if time.monotonic() >= deadline:
        return outcome  # never sent: lost
    start = time.perf_counter()
    try:
        stream = client.completions.create(
            model=route.model, prompt=request.prompt, max_tokens=max_tokens, temperature=0, stream=True,
            extra_body=route.extra_body, timeout=max(deadline - time.monotonic(), 1.0),
        )
        for chunk in stream:
            for choice in chunk.choices:
                if outcome.ttft_s is None and (choice.text or choice.finish_reason):
                    outcome.ttft_s = time.perf_counter() - start
                outcome.text += choice.text or ""
                outcome.finished = outcome.finished or choice.finish_reason is not None
            if chunk.usage is not None:
                outcome.tokens = chunk.usage.completion_tokens
    except APIError as error:  # the `openai` client wraps connection errors, mid-stream too
        outcome.error = f"{type(error).__name__}: {error}" + (f" ({error.__cause__!r})" if error.__cause__ else "")
    return outcome


def run_system(system: str, requests: list[LoadRequest], *, clients: int, max_tokens: int, threads: int,
               deadline: float) -> Report:
    """Start `system`, warm each tenant up with one untimed request, send `requests` from `clients`
    concurrent clients (each sends its next request when its last is answered), stop the system."""
    with tempfile.TemporaryDirectory() as logs, Servers(Path(logs), threads) as servers:
        routes = start_system(system, servers, clients, deadline)
        # uvicorn (under both systems) closes a connection idle for 5 s; a client reusing it at that instant
        # gets a connection error that is no server's fault, so the clients let idle connections go sooner.
        limits = type(DEFAULT_CONNECTION_LIMITS)(max_connections=clients, max_keepalive_connections=clients,
                                                 keepalive_expiry=1.0)
        connections = {url: OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                                   http_client=DefaultHttpxClient(limits=limits))
                       for url in {route.url for route in routes.values()}}

        def run(request: LoadRequest) -> Outcome:
            route = routes[request.tenant]
            return send(connections[route.url], route, request, max_tokens, deadline)

        for tenant in TENANTS:
            warm = run(LoadRequest(-1, tenant, testbed.TASKS[tenant].held_out(1)[0].prompt))
            if not warm.finished:
                raise RuntimeError(f"{system}: the warm-up request for {tenant} failed: {warm.error or 'no answer'}")
        pool = ThreadPoolExecutor(clients, thread_name_prefix=f"{system}-client")
        try:
            with PeakMemory([server.process.pid for server in servers.servers]) as memory:
                start = time.perf_counter()
                outcomes = list(pool.map(run, requests))
                wall_s = time.perf_counter() - start
        finally:  # on Ctrl-C, stop the servers now rather than after the requests in flight
            pool.shutdown(wait=False, cancel_futures=True)
        return Report(system, len(servers.servers), outcomes, wall_s, memory.peak_bytes)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: a value that was measured."""
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def mismatches(reference: Report, report: Report) -> int:
    """Requests both systems answered in full, with different text."""
    texts = {outcome.request.index: outcome.text for outcome in reference.completed}
    return sum(o.request.index in texts and o.text != texts[o.request.index] for o in report.completed)


def summary_table(reports: list[Report]) -> str:
    reference = reports[0]
    lines = [
        "| system | server processes | requests | errors | lost | wall (s) | completion tokens | tokens/s "
        f"| requests/s | peak RSS, all servers (MiB) | answers differing from {reference.system} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for report in reports:
        lines.append(
            f"| {report.system} | {report.processes} | {len(report.outcomes)} | {report.errors} | {report.lost} "
            f"| {report.wall_s:.1f} | {report.tokens} | {report.tokens_per_s:.1f} "
            f"| {len(report.completed) / report.wall_s:.2f} | {report.peak_rss_bytes / 2**20:.0f} "
            f"| {mismatches(reference, report)} |"
        )
    return "\n".join(lines)


def ttft_table(reports: list[Report]) -> str:
    """Per tenant: its requests and, per system, the p50 and p99 of its time to first token."""
    head = "".join(f" {report.system} p50 | {report.system} p99 |" for report in reports)
    lines = [f"| tenant | requests |{head}", "|---|---:|" + "---:|---:|" * len(reports)]
    for tenant in TENANTS:
        count = sum(outcome.request.tenant == tenant for outcome in reports[0].outcomes)
        cells = []
        for report in reports:
            values = report.ttfts(tenant)
            cells += [f"{percentile(values, q) * 1000:.0f} ms" if values else "-" for q in (0.5, 0.99)]
        lines.append(f"| {tenant} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(reports: list[Report]) -> str:
    """The first system against each other one, measured in this run."""
    first = reports[0]
    lines = []
    for other in reports[1:]:
        if not (first.completed and other.completed):
            continue
        speed = first.tokens_per_s / other.tokens_per_s
        p50 = [percentile(first.ttfts(t), 0.5) / percentile(other.ttfts(t), 0.5) for t in TENANTS
               if first.ttfts(t) and other.ttfts(t)]
        lines.append(
            f"{first.system} / {other.system}, this run: throughput {speed:.2f}x, peak memory "
            f"{first.peak_rss_bytes / other.peak_rss_bytes:.2f}x, p50 TTFT {min(p50):.2f}x to {max(p50):.2f}x "
            f"(per tenant)."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Report]:
    parser = argparse.ArgumentParser(prog="python -m multimoe.serving.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def count(name: str, minimum: int = 1):
        return number_argument(name, integer=True, minimum=minimum)

    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                        help="run one after the other; answers are compared with the first's")
    parser.add_argument("--clients", type=count("--clients"), default=8, help="concurrent streaming clients")
    parser.add_argument("--requests", type=count("--requests", len(TENANTS)), default=2048)
    parser.add_argument("--max-tokens", type=count("--max-tokens"), default=32, help="new tokens per request")
    parser.add_argument("--seed", type=count("--seed", 0), default=0, help="the order of the requests")
    parser.add_argument("--flood", action="store_true",
                        help=f"{TENANTS[0]} sends {FLOOD_SHARE:.0%} of the requests, the other tenants the rest")
    parser.add_argument("--threads", type=count("--threads"), default=1,
                        help="OMP_NUM_THREADS of every server process")
    parser.add_argument("--timeout", type=count("--timeout"), default=1200,
                        help="seconds for the whole run; requests not sent by then count as lost")
    parser.add_argument("--write-docs", nargs="?", const="docs/benchmarks.md", default=None,
                        help="rewrite this mix's load-test section of this markdown file (default docs/benchmarks.md)")
    args = parser.parse_args(argv)
    if "transformers" in args.systems:
        from transformers.utils.import_utils import is_serve_available

        if not is_serve_available():
            parser.error("the transformers system needs `transformers serve`: pip install 'transformers[serving]'")
    requests = request_list(args.requests, args.seed, args.flood)
    context = testbed_context()
    longest = max(len(testbed.tokenizer()(request.prompt)["input_ids"]) for request in requests)
    if longest + args.max_tokens > context:
        parser.error(f"--max-tokens: at most {context - longest} here (the testbed's context is {context} tokens, "
                     f"the longest prompt {longest})")

    deadline = time.monotonic() + args.timeout
    reports = [run_system(system, requests, clients=args.clients, max_tokens=args.max_tokens, threads=args.threads,
                          deadline=deadline) for system in args.systems]
    mix = f"{TENANTS[0]} sends {FLOOD_SHARE:.0%} of them" if args.flood else "evenly over the tenants"
    header = (
        f"{len(requests)} requests ({mix}, seed {args.seed}), {args.clients} concurrent streaming clients, "
        f"{args.max_tokens} new tokens each (greedy, EOS ignored); {args.threads} torch thread(s) per server process, "
        f"{len(os.sched_getaffinity(0))} cores for servers and clients together; TTFT in milliseconds."
    )
    for report in reports:
        failed = [outcome.error for outcome in report.outcomes if outcome.error]
        if failed:
            print(f"{report.system}: {len(failed)} errors, the first: {failed[0]}", file=sys.stderr)
    parts = [header, summary_table(reports), ttft_table(reports), ratios(reports)]
    section = "\n\n".join(part for part in parts if part)
    print(section)
    if args.write_docs:
        command = "python -m multimoe.serving.load" + (" " + " ".join(argv) if argv else "")
        write_section(Path(args.write_docs), *DOCS_MARKERS[args.flood], f"Command: `{command}`\n\n{section}")
    if any(report.errors or report.lost for report in reports):
        raise SystemExit(1)
    return reports


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so the servers are stopped too
    main(sys.argv[1:])
