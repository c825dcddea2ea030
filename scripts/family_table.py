"""Which of transformers' fused-experts MoE families multimoe serves: try each one for real and
write the result table into docs/families.md (between the `family-table` markers).

For every causal LM in transformers' registry whose experts class is decorated with
`@use_experts_implementation` (the fused-experts families), in a subprocess of its own:

1. shrink the family's default config to a tiny one with generic rules (widths, heads, layer
   count and per-layer patterns, experts, top-k, vocabulary, ...); the six built-in families use
   `multimoe.testing.tiny_config` instead, which exercises what sets each apart;
2. for a family multimoe does not register, detect the sparse block of a decoder layer (the child
   holding a decorated experts class) and register a generic adapter:
   `multimoe.register_family(multimoe.Family(model_type, sparse_block=...))`;
3. build a random base and a stand-in fine-tune (`multimoe.testing.fine_tune`: every non-expert
   tensor moved, expert 1 changed), `multimoe.from_models`, and check in fp32 that each tenant's
   logits equal its own model's within 1e-4, that a mixed batch (`tenant_names=["b", "a"]`) does
   too, and that greedy generation of 4 tokens (per tenant, then mixed) gives the same tokens.

    python scripts/family_table.py                      # every family, rewrites the table
    python scripts/family_table.py --only olmoe glm4_moe --no-write

Not part of CI: a full run takes minutes (each family runs in a fresh interpreter, under a
per-family timeout).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "families.md"
START, END = "<!-- family-table:start -->", "<!-- family-table:end -->"
RESULT_PREFIX = "FAMILY-TABLE-RESULT "
TOLERANCE = 1e-4
PROMPT_LENGTH, NEW_TOKENS = 12, 4
DECORATOR = "@use_experts_implementation"


# -- which families ------------------------------------------------------------------------------


def is_fused_experts_class(value) -> bool:
    """A class `@use_experts_implementation` decorated: the decorator gives it `_apply_gate`."""
    import torch

    return isinstance(value, type) and issubclass(value, torch.nn.Module) and hasattr(value, "_apply_gate")


def fused_families() -> list[tuple[str, str, str]]:
    """(model_type, causal LM class name, how it was detected) of every fused-experts family.

    Two checks, both cheap (no model is built): the modeling module's source uses the decorator
    (transformers' own test, `PreTrainedModel._can_set_experts_implementation`), or the module's
    namespace holds a decorated class (which also catches an experts class imported from another
    family's module). On transformers 5.24 the two agree on every family; the worker then checks
    the built model itself (a causal LM with a submodule of a decorated class)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        try:
            module = sys.modules[getattr(transformers, class_name).__module__]
            source = DECORATOR in inspect.getsource(module)
        except Exception:  # noqa: BLE001 - a class that does not import is not a family we can try
            continue
        namespace = any(is_fused_experts_class(value) for value in vars(module).values())
        if source or namespace:
            how = "source and namespace" if source and namespace else ("source" if source else "namespace")
            found.append((model_type, class_name, how))
    return found


# -- shrinking a config ----------------------------------------------------------------------------

HIDDEN, HEADS, HEAD_DIM, VOCAB, MAX_POSITIONS, WINDOW = 64, 4, 16, 128, 256, 8
MIN_LAYERS, MAX_LAYERS = 3, 6
# Plain integer fields and their tiny values (set only where the family's config has the field).
TINY_INTEGERS = {
    "hidden_size": HIDDEN,
    "num_attention_heads": HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    "unpadded_vocab_size": VOCAB,
    "vocab_size_per_layer_input": VOCAB,
    "max_position_embeddings": MAX_POSITIONS,
    "model_max_length": MAX_POSITIONS,
    "sliding_window": WINDOW,
    "sliding_window_size": WINDOW,
    # multi-head latent attention and its indexers
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "o_lora_rank": 16,
    "o_groups": 2,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "qk_head_dim": 24,
    "v_head_dim": 16,
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_topk": 4,
    # linear attention, sliding-window attention with its own heads, state-space mixers
    "linear_num_heads": 2,
    "linear_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "swa_num_attention_heads": HEADS,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": HEAD_DIM,
    "mamba_d_state": 16,
    "mamba_dt_rank": 8,
    "mamba_chunk_size": 16,
    "mamba_n_groups": 1,
    "ssm_state_size": 16,
    "n_groups": 1,
    "hidden_size_per_layer_input": 16,
    "ple_embed_dim": 16,
    "gated_norm_rank": 8,
    "loop_gate_rank": 8,
    "router_hidden_size": 16,
}
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k")
GROUP_FIELDS = ("n_group", "num_expert_group")
# Fields that make the first k layers dense: k becomes the number of leading dense layers kept.
DENSE_PREFIX_FIELDS = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index")


def layer_selection(per_layer: dict[str, list]) -> list[int]:
    """Indices of the default config's layers to keep: the first layer of every distinct
    combination of per-layer settings (attention kind, dense or sparse MLP, ...), topped up with
    the lowest other indices to MIN_LAYERS, at most MAX_LAYERS."""
    count = len(next(iter(per_layer.values())))
    seen, keep = set(), []
    for index in range(count):
        signature = tuple(json.dumps(values[index], sort_keys=True, default=str) for values in per_layer.values())
        if signature not in seen:
            seen.add(signature)
            keep.append(index)
    for index in range(count):
        if len(keep) >= MIN_LAYERS:
            break
        if index not in keep:
            keep.append(index)
    return sorted(keep)[:MAX_LAYERS]


def token_id_fields(fields: dict, vocab: int) -> dict:
    """Token ids (`pad_token_id`, `eos_token_id`, `image_token_id`, ...) moved inside a tiny
    vocabulary: pad 0, bos 1, eos 2 where they were out of range, any other id a spare one."""
    preferred = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    spare = iter(range(vocab - 1, 3, -1))
    changed = {}
    for key, value in fields.items():
        if not (key.endswith("_token_id") or key.endswith("_token_index")) or isinstance(value, bool):
            continue
        if isinstance(value, int) and value >= vocab:
            changed[key] = preferred.get(key, next(spare))
        elif isinstance(value, list) and any(isinstance(v, int) and v >= vocab for v in value):
            kept = [v for v in value if isinstance(v, int) and v < vocab]
            changed[key] = kept or [preferred.get(key, next(spare))]
    return changed


def shrunk_fields(default) -> tuple[dict, str]:
    """Constructor arguments that make the family's default config `default` tiny, and a short
    description of the layers kept."""
    fields = default.to_dict()
    layers = fields.get("num_hidden_layers")
    tiny: dict = {}
    for key, value in fields.items():
        if isinstance(value, bool) or value is None:
            continue
        if key in TINY_INTEGERS and isinstance(value, int):
            tiny[key] = TINY_INTEGERS[key]
        elif key.endswith("intermediate_size") and isinstance(value, int):
            tiny[key] = 0 if value == 0 else (128 if key == "intermediate_size" else 32)
        elif key.endswith("intermediate_size") and isinstance(value, list):
            tiny[key] = [0 if v == 0 else 32 for v in value]
        elif key in EXPERT_COUNT_FIELDS and isinstance(value, int):
            tiny[key] = min(max(value, 4), 8)
        elif key in TOP_K_FIELDS and isinstance(value, int):
            tiny[key] = min(value, 2)
        elif key in GROUP_FIELDS and isinstance(value, int):
            tiny[key] = 2 if value > 1 else 1
        elif key == "topk_group" and isinstance(value, int):
            tiny[key] = 1
        elif key in ("num_key_value_heads",) and isinstance(value, int):
            heads = fields.get("num_attention_heads")
            tiny[key] = HEADS if value == heads else (1 if value == 1 else 2)
        elif key in ("mamba_n_heads", "mamba_num_heads") and isinstance(value, int):
            tiny[key] = 8
    if "qk_head_dim" in tiny and "qk_nope_head_dim" in fields and "qk_rope_head_dim" in fields:
        tiny["qk_head_dim"] = tiny["qk_nope_head_dim"] + tiny["qk_rope_head_dim"]
    expand = fields.get("mamba_expand", 2)
    for heads, head_dim in (("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim")):
        if head_dim in fields and isinstance(fields[head_dim], int):
            tiny[head_dim] = expand * HIDDEN // tiny.get(heads, 8)
    tiny.update(token_id_fields(fields, VOCAB))
    tiny["initializer_range"] = 0.2  # as multimoe.testing: logits of a random model then mean something

    # Layers: per-layer lists are cut to a selection covering every kind of layer; patterns given
    # by index (the first k dense, every n-th sparse, ...) are rewritten for the layers kept.
    description = ""
    if isinstance(layers, int):
        per_layer = {
            key: value
            for key, value in fields.items()
            if isinstance(value, list) and len(value) == layers and layers > 1 and key != "architectures"
        }
        keep = layer_selection(per_layer) if per_layer else list(range(MIN_LAYERS))
        tiny["num_hidden_layers"] = len(keep)
        for key, value in per_layer.items():
            tiny[key] = [value[index] for index in keep]
        for key, value in fields.items():  # per-layer settings keyed by layer index ("02": {...})
            if isinstance(value, dict) and value and all(isinstance(k, str) and re.fullmatch(r"\d+", k) for k in value):
                width = len(next(iter(value)))
                tiny[key] = {str(new).zfill(width): value[old] for new, index in enumerate(keep)
                             for old in value if int(old) == index}
        mlp_kinds = tiny.get("mlp_layer_types")
        leading_dense = 1
        if isinstance(mlp_kinds, list):
            leading_dense = next((i for i, kind in enumerate(mlp_kinds) if kind != "dense"), len(mlp_kinds))
        for key in DENSE_PREFIX_FIELDS:
            if isinstance(fields.get(key), int) and not isinstance(fields.get(key), bool):
                tiny[key] = min(fields[key], leading_dense)
        if isinstance(fields.get("mlp_only_layers"), list):
            tiny["mlp_only_layers"] = [new for new, index in enumerate(keep) if index in fields["mlp_only_layers"]]
        if isinstance(fields.get("decoder_sparse_step"), int):
            tiny["decoder_sparse_step"] = 1
        if isinstance(fields.get("moe_layer_end_index"), int):
            tiny["moe_layer_end_index"] = len(keep) - 1
        if isinstance(fields.get("moe_layer_interval"), int):
            tiny["moe_layer_interval"] = 1
        for period, offset in (("attn_layer_period", "attn_layer_offset"), ("expert_layer_period", "expert_layer_offset")):
            if isinstance(fields.get(period), int) and isinstance(fields.get(offset), int):
                tiny[period], tiny[offset] = 2, 1
        if "max_window_layers" in fields and isinstance(fields["max_window_layers"], int):
            tiny["max_window_layers"] = len(keep)
        description = f"layers {keep} of {layers}" if per_layer else f"{len(keep)} layers"
    return tiny, description


def shrink(config_class, model_type: str):
    """The tiny config of a family (the built-in ones: `multimoe.testing.tiny_config`)."""
    import multimoe.testing

    if model_type in multimoe.testing.TINY_FIELDS:
        return multimoe.testing.tiny_config(model_type), "multimoe.testing.tiny_config"
    default = config_class()
    fields, description = shrunk_fields(default)
    return config_class(**fields), f"generic shrink, {description}"


# -- one family, in its own interpreter ----------------------------------------------------------


def sparse_block_of_layers(family, config) -> tuple[str, str] | None:
    """(sparse block attribute, experts attribute) of the family's decoder layers: the child of a
    layer holding a child of a decorated experts class."""
    import torch

    found = set()
    with torch.device("meta"):
        for layer_idx in range(config.num_hidden_layers):
            layer = family.decoder_layer_class(config, layer_idx)
            for name, child in layer.named_children():
                for inner, grandchild in child.named_children():
                    if is_fused_experts_class(type(grandchild)):
                        found.add((name, inner))
    if len(found) > 1:
        raise RuntimeError(f"the decoder layers hold fused experts in several places: {sorted(found)}")
    return found.pop() if found else None


def new_tokens(sequence, eos) -> list[int]:
    """The generated tokens of one row, up to its first EOS (a batch pads a row that finished)."""
    stops = set(eos if isinstance(eos, list) else [eos]) - {None}
    tokens = []
    for token in sequence[PROMPT_LENGTH:].tolist():
        tokens.append(token)
        if token in stops:
            break
    return tokens


def max_difference(first, second) -> float:
    return float((first.float() - second.float()).abs().max())


def classify(error: BaseException) -> str:
    """'refused' for an error multimoe raises on purpose, else 'fails'."""
    import multimoe
    from multimoe.checkpoints import CheckpointError

    deliberate = (multimoe.UnsupportedFamilyError, CheckpointError, multimoe.IncompatibleTenantsError)
    if isinstance(error, deliberate):
        return "refused"
    if isinstance(error, AttributeError) and "a mixed-tenant batch cannot run it" in str(error):
        return "refused"
    return "fails"


def summary(error: BaseException) -> str:
    """The exception, one line, with where it was raised (file:line of the innermost frame)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = ""
    if frames:
        frame = frames[-1]
        path = frame.filename
        for marker in ("site-packages/", "/work/main/"):
            if marker in path:
                path = path.split(marker, 1)[1]
        where = f" [{path}:{frame.lineno}]"
    message = " ".join(str(error).split())
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(error).__name__}: {message}{where}"


def try_family(model_type: str) -> dict:
    """Run every check for one family; returns the table row's fields."""
    import torch
    from transformers.utils import logging

    import multimoe
    from multimoe.families import FAMILIES, Family
    from multimoe.testing import fine_tune, random_model

    logging.set_verbosity_error()
    torch.manual_seed(0)
    row = {"registered": "", "result": "", "note": ""}
    notes: list[str] = []
    builtin = model_type in FAMILIES
    family = FAMILIES[model_type] if builtin else Family(model_type)
    row["registered"] = "built-in" if builtin else ""

    try:
        config, how = shrink(family.config_class, model_type)
    except Exception as error:  # noqa: BLE001
        row["result"] = f"not tried: config could not be shrunk ({summary(error)})"
        return row
    notes.append(f"config: {how}")
    config._attn_implementation = "eager"

    if not builtin:
        try:
            located = sparse_block_of_layers(family, config)
        except Exception as error:  # noqa: BLE001
            row["result"] = f"not tried: decoder layers could not be built ({summary(error)})"
            row["note"] = "; ".join(notes)
            return row
        if located is None:
            row["result"] = "not tried: no decoder layer holds a fused experts module (no sparse block found)"
            row["note"] = "; ".join(notes)
            return row
        sparse_block, experts = located
        options = {"sparse_block": sparse_block} | ({"experts": experts} if experts != "experts" else {})
        family = Family(model_type, **options)
        row["registered"] = "generic adapter (" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"
        try:
            multimoe.register_family(family)
        except Exception as error:  # noqa: BLE001
            row["result"] = f"{classify(error)}: register_family: {summary(error)}"
            row["note"] = "; ".join(notes)
            return row
    try:  # what multimoe's own refusal of extra base-model modules would say (see docs/families.md)
        family.check()
    except Exception as error:  # noqa: BLE001
        notes.append(f"Family.check() refuses it: {summary(error)}")

    step = "build the models"
    try:
        base = random_model(config, seed=0)
        if not any(is_fused_experts_class(type(module)) for module in base.modules()):
            row["result"] = "not tried: the causal LM holds no fused experts module"
            row["note"] = "; ".join(notes)
            return row
        tuned = fine_tune(base, seed=1, changed_experts=[1])
        owners = {"a": base, "b": tuned}
        step = "from_models"
        model = multimoe.from_models(owners).eval()
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, config.vocab_size, (2, PROMPT_LENGTH), generator=generator)
        differences = {}
        with torch.no_grad():
            step = "single-tenant logits"
            for name, own in owners.items():
                differences[name] = max_difference(model(ids, tenant=name).logits, own(ids).logits)
            step = "mixed-batch logits"
            mixed = model(ids, tenant_names=["b", "a"]).logits
            differences["mixed"] = max(
                max_difference(mixed[row_idx], owners[name](ids[row_idx : row_idx + 1]).logits[0])
                for row_idx, name in enumerate(["b", "a"])
            )
        worst = max(differences.values())
        notes.append("max |logit diff| " + ", ".join(f"{k} {v:.1e}" for k, v in differences.items()))
        if not worst <= TOLERANCE:
            bad = [k for k, v in differences.items() if not v <= TOLERANCE]
            row["result"] = f"fails: wrong logits ({', '.join(bad)}: max |diff| {worst:.2e} > {TOLERANCE:g})"
            row["note"] = "; ".join(notes)
            return row
        greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
        step = "greedy generation"
        for name, own in owners.items():
            expected = own.generate(ids[:1], **greedy)
            got = model.generate(ids[:1], tenant=name, **greedy)
            if not torch.equal(expected, got):
                row["result"] = f"fails: greedy generation of tenant {name} differs ({got.tolist()} != {expected.tolist()})"
                row["note"] = "; ".join(notes)
                return row
        step = "mixed greedy generation"
        got = model.generate(ids, tenant_names=["b", "a"], **greedy)
        for row_idx, name in enumerate(["b", "a"]):
            expected = owners[name].generate(ids[row_idx : row_idx + 1], **greedy)
            eos = owners[name].generation_config.eos_token_id
            if new_tokens(expected[0], eos) != new_tokens(got[row_idx], eos):  # a finished row is padded
                row["result"] = f"fails: mixed greedy generation differs for row {row_idx} ({name})"
                row["note"] = "; ".join(notes)
                return row
        row["result"] = "works"
        notes.append(f"greedy {NEW_TOKENS} tokens equal (per tenant and mixed)")
    except Exception as error:  # noqa: BLE001
        row["result"] = f"{classify(error)}: {step}: {summary(error)}"
    row["note"] = "; ".join(notes)
    return row


def worker(model_type: str) -> None:
    started = time.perf_counter()
    try:
        row = try_family(model_type)
    except Exception as error:  # noqa: BLE001 - the row says what broke, whatever it was
        row = {"registered": "", "result": f"fails: {summary(error)}", "note": ""}
    row["seconds"] = time.perf_counter() - started
    print(RESULT_PREFIX + json.dumps(row), flush=True)


# -- driving it and writing the table ------------------------------------------------------------


def run_family(model_type: str, timeout: float) -> dict:
    environment = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", model_type]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"registered": "", "result": f"not finished: timed out after {timeout:g} s", "note": "",
                "seconds": time.perf_counter() - started}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"registered": "", "result": f"fails: the worker exited with code {done.returncode} ({last[:200]})",
            "note": "", "seconds": time.perf_counter() - started}


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> str:
    lines = [
        "| family (model_type) | causal LM class | registered in multimoe | result | note |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        note = f"{row['seconds']:.1f} s" + (f"; {row['note']}" if row.get("note") else "")
        lines.append(
            f"| `{row['model_type']}` | `{row['class_name']}` | {cell(row['registered'] or '-')} "
            f"| {cell(row['result'])} | {cell(note)} |"
        )
    return "\n".join(lines)


def write_table(rows: list[dict], command: str) -> None:
    import transformers

    import multimoe

    counts: dict[str, int] = {}
    for row in rows:
        kind = row["result"].split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    header = (
        f"Produced by `{command}` with transformers {transformers.__version__}, torch "
        f"{__import__('torch').__version__}, multimoe {multimoe.__version__} "
        f"({len(rows)} families: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ")."
    )
    text = DOC.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{DOC} has no {START} ... {END} markers to write the table between.")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    DOC.write_text(f"{before}{START}\n{header}\n\n{table(rows)}\n{END}{after}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="MODEL_TYPE", help="try only these families")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per family (default 60)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/families.md alone")
    parser.add_argument("--worker", metavar="MODEL_TYPE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    families = fused_families()
    if args.only:
        known = {model_type for model_type, _, _ in families}
        unknown = sorted(set(args.only) - known)
        if unknown:
            parser.error(f"not fused-experts causal LM families of this transformers: {unknown}")
        families = [family for family in families if family[0] in args.only]
    rows = []
    for model_type, class_name, _ in families:
        row = run_family(model_type, args.timeout) | {"model_type": model_type, "class_name": class_name}
        rows.append(row)
        print(f"{model_type:24s} {row['seconds']:6.1f} s  {row['result']}", flush=True)
    print()
    print(table(rows))
    if not args.no_write:
        command = "python scripts/family_table.py" + (f" --timeout {args.timeout:g}" if args.timeout != 60 else "")
        if args.only:
            command += " --only " + " ".join(args.only)
        write_table(rows, command)
        print(f"\nwrote the table into {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
