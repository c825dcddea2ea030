"""The `multimoe` command line.

    multimoe consolidate --tenant base=org/moe-base --tenant chat=./chat --memory-budget 1.25x --out merged
    multimoe demo
    multimoe serve org/four-tenants --port 8000      # or --testbed
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .validation import number_argument


def tenant_argument(text: str) -> tuple[str, str]:
    name, separator, source = text.partition("=")
    if not separator or not name or not source:
        raise argparse.ArgumentTypeError(f"--tenant takes NAME=SOURCE (a directory or Hub id), got {text!r}")
    return name, source


def budget_argument(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def delta_rank_argument(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"--delta-rank takes an int >= 0 or 'auto', got {text!r}")
    return int(text)


def output_argument(kind: str) -> Callable[[str], str]:
    """An argparse `type` for a path written only after the consolidation (`kind`: "directory" or
    "file"): refused now, with exit status 2, where writing it then would fail."""

    def parse(text: str) -> str:
        path = Path(text)
        existing = next(p for p in (path, *path.parents) if p.exists())
        if existing == path and path.is_dir() != (kind == "directory"):
            problem = f"{text} exists and is not a {kind}"
        elif existing != path and not existing.is_dir():
            problem = f"cannot create {text}: {existing} is a file"
        elif not os.access(existing, os.W_OK):
            problem = f"cannot write {text}: {existing} is not writable"
        else:
            return text
        raise argparse.ArgumentTypeError(problem)

    return parse


def read_calibration(path: Path) -> list:
    """One text per line, or (.jsonl) one prompt/completion pair per line."""
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if path.suffix != ".jsonl":
        return [line for _, line in lines]
    samples = []
    for number, line in lines:
        try:
            samples.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not JSON ({error.msg})") from None
    return samples


def consolidate_command(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from .consolidation import consolidate

    names = [name for name, _ in args.tenant]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"each --tenant needs its own name; given more than once: {', '.join(repeated)}")
    tenants = dict(args.tenant)
    calibration = read_calibration(Path(args.calibration)) if args.calibration else None
    tokenizer = None
    if args.calibration or args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.tenant[0][1])
    model = consolidate(
        tenants,
        similarity=args.similarity,
        grouping=args.grouping,
        merge=args.merge,
        anchor=args.anchor,
        threshold=args.threshold,
        memory_budget=args.memory_budget,
        calibration=calibration,
        tokenizer=tokenizer,
        max_quality_loss=args.max_quality_loss,
        allocation=args.allocation,
        delta_rank=args.delta_rank,
        recover_steps=args.recover_steps,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        revision=args.revision,
    )
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    if args.heatmap:
        Path(args.heatmap).parent.mkdir(parents=True, exist_ok=True)
        model.consolidation_report.heatmap(args.heatmap)
    print(model.consolidation_report.to_markdown())
    print()
    print(model.memory_report().to_markdown())
    print(f"\nsaved to {args.out}")


def demo_command(args: argparse.Namespace) -> None:
    from transformers.utils import logging

    from .demo import main as demo

    logging.disable_progress_bar()  # five checkpoint loads would bury the output
    torch.set_num_threads(args.threads)
    demo(memory_budget=args.memory_budget, examples=args.examples, family=args.family)


def serve_command(args: argparse.Namespace) -> None:
    if (args.source is None) == (not args.testbed):
        raise ValueError("give a model (directory or Hub id) or --testbed, not both")
    from .serving.openai_server import OpenAIServer, load_for_serving, serve

    model, tokenizer = load_for_serving(args.source, testbed=args.testbed, device=args.device, dtype=args.dtype)
    server = OpenAIServer(model, tokenizer, tenant_tokenizers=model.tenant_tokenizers,
                          max_batch_size=args.max_batch_size, shutdown_timeout_s=args.shutdown_timeout)
    print(f"serving {', '.join(model.tenants)} at http://{args.host}:{args.port}/v1", flush=True)
    serve(server, host=args.host, port=args.port)


def parser() -> argparse.ArgumentParser:
    from .consolidation import GROUPINGS, MERGE_RULES, SIMILARITY_METRICS
    from .families import FAMILIES

    root = argparse.ArgumentParser(
        prog="multimoe", description="Serve many fine-tunes of one Mixture-of-Experts model from one shared expert pool."
    )
    commands = root.add_subparsers(dest="command", required=True)
    command = commands.add_parser(
        "consolidate",
        help="merge N fine-tunes of one MoE model (any supported family, read from the sources) into one "
        "multi-tenant model",
    )
    command.add_argument("--tenant", type=tenant_argument, action="append", required=True, metavar="NAME=SOURCE",
                         help="a fine-tune (directory or Hub id); all tenants are of one family: "
                         + ", ".join(sorted(FAMILIES)))
    command.add_argument("--out", type=output_argument("directory"), required=True,
                         help="directory to save the consolidated model in")
    command.add_argument("--similarity", default="weight_l2", choices=sorted(SIMILARITY_METRICS))
    command.add_argument("--grouping", default="cross_index", choices=sorted(GROUPINGS))
    command.add_argument("--merge", default="select", choices=sorted(MERGE_RULES))
    command.add_argument("--threshold", type=number_argument("threshold", unbounded=True),
                         help="a distance limit; inf: none, every expert may be shared")
    command.add_argument("--memory-budget", type=budget_argument, help="bytes, or a multiple of one model: 1.25x")
    command.add_argument("--anchor", default="first", help="first, most_sensitive, or a tenant name")
    command.add_argument(
        "--calibration",
        help="a text file, one calibration sample per line, or a .jsonl file of {\"prompt\", \"completion\"} pairs",
    )
    command.add_argument("--tokenizer", help="tokenizer for the calibration text (default: the first tenant's)")
    command.add_argument("--max-quality-loss", type=number_argument("max_quality_loss"))
    command.add_argument("--allocation", default="distance", choices=["distance", "loss"],
                         help="rank merges by distance, or by the loss each costs its tenant (needs --calibration)")
    command.add_argument("--delta-rank", type=delta_rank_argument,
                         help="low-rank expert deltas: a rank for every merged expert, or auto (within "
                              "--memory-budget)")
    command.add_argument("--recover-steps", type=number_argument("recover_steps", integer=True), default=0,
                         help="distillation recovery steps after merging (needs --calibration)")
    command.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    command.add_argument("--revision")
    command.add_argument("--max-shard-size", default="5GB")
    command.add_argument("--heatmap", type=output_argument("file"),
                         help="write the expert-similarity heatmap to this PNG")
    command.set_defaults(run=consolidate_command)
    command = commands.add_parser("demo", help="consolidate the shipped task fine-tunes and show memory and quality")
    command.add_argument("--family", choices=["mixtral", "switch", "switch_transformers"], default="mixtral",
                         help="which shipped testbed: Mixtral (exact match) or Switch Transformers (seq2seq, ROUGE)")
    command.add_argument("--memory-budget", default="1.25x", help="a multiple of one model: 1.25x")
    command.add_argument("--examples", type=number_argument("examples", integer=True, positive=True), default=50,
                         help="held-out prompts per task for the quality table")
    command.add_argument("--threads", type=number_argument("threads", integer=True, positive=True), default=2)
    command.set_defaults(run=demo_command)
    command = commands.add_parser("serve", help="an OpenAI-compatible server in which every tenant is a model")
    command.add_argument("source", nargs="?", help="a saved multi-tenant model: directory or Hub id")
    command.add_argument("--testbed", action="store_true", help="serve the shipped task fine-tunes instead")
    command.add_argument("--host", default="127.0.0.1")
    command.add_argument("--port", type=number_argument("port", integer=True, positive=True), default=8000)
    command.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    command.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    command.add_argument("--max-batch-size", type=number_argument("max_batch_size", integer=True, positive=True),
                         default=8, help="rows in the running batch, all tenants together")
    command.add_argument("--shutdown-timeout", type=number_argument("shutdown_timeout"), default=30.0,
                         help="seconds requests in flight get to finish after SIGTERM before they are aborted")
    command.set_defaults(run=serve_command)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:  # bad input: say what is wrong, without a traceback
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
