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
    python scripts/family_table.py --only olmoe glm4_moe   # those rows, printed only

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

HIDDEN, HEADS, VOCAB, MAX_POSITIONS, WINDOW = 64, 4, 128, 256, 8
HEAD_DIM_DIVISOR = 8  # every head width (head_dim, qk_rope_head_dim, v_head_dim, ...) shrinks by it
MIN_LAYERS, MAX_LAYERS = 3, 6
# Plain integer fields and their tiny values (set only where the family's config has the field).
TINY_INTEGERS = {
    "hidden_size": HIDDEN,
    "num_attention_heads": HEADS,
    "vocab_size": VOCAB,
    "unpadded_vocab_size": VOCAB,
    "vocab_size_per_layer_input": VOCAB,
    "max_position_embeddings": MAX_POSITIONS,
    "model_max_length": MAX_POSITIONS,
    "sliding_window": WINDOW,
    "sliding_window_size": WINDOW,
    # low-rank projections (latent attention, gates)
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "o_lora_rank": 16,
    "o_groups": 2,
    "gated_norm_rank": 8,
    "loop_gate_rank": 8,
    # attention indexers, linear attention, sliding-window attention with heads of its own
    "index_n_heads": 2,
    "index_topk": 4,
    "linear_num_heads": 2,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "swa_num_attention_heads": HEADS,
    "swa_num_key_value_heads": 2,
    # state-space mixers
    "mamba_d_state": 16,
    "mamba_dt_rank": 8,
    "mamba_chunk_size": 16,
    "mamba_n_groups": 1,
    "ssm_state_size": 16,
    "n_groups": 1,
    # per-layer inputs and small side networks
    "hidden_size_per_layer_input": 16,
    "ple_embed_dim": 16,
    "router_hidden_size": 16,
}
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts")
GROUP_FIELDS = ("n_group", "num_expert_group")
SHARED_EXPERT_FIELDS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
# Fields that make the first k layers dense: k becomes the number of leading dense layers kept.
DENSE_PREFIX_FIELDS = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index")
# Switches that turn a family's MoE block on (Gemma 4's is off by default).
MOE_SWITCHES = ("enable_moe_block",)
# Fields a family's default config leaves unset although its own layers cannot be built without
# them (no generic rule can guess their values), by config model_type, from the tiny fields.
DEFAULT_GAPS = {
    "lfm2_moe": lambda tiny: {"layer_types": ["conv" if i % 2 == 0 else "full_attention"
                                              for i in range(tiny["num_hidden_layers"])]},
    "qwen4_exp_text": lambda tiny: dict(
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=tiny.get("head_dim", 16), indexer_budget=8,
        indexer_compress_ratio=2,
    ),
}


def is_head_width(key: str) -> bool:
    return key.endswith("head_dim") and not key.startswith("mamba")


def tiny_integer(key: str, value, fields: dict):
    """The tiny value of one field (of the config, or of a per-layer override), or None to keep it."""
    if isinstance(value, bool):
        return None
    if value is None:  # a size left unset that the family's layers read (DeepSeek-V2's top-k, ...)
        if key in TOP_K_FIELDS:
            return 2
        if key in EXPERT_COUNT_FIELDS:
            return 8
        if key == "head_dim":
            return HIDDEN // HEADS
        if key == "moe_intermediate_size":
            return 32
        if key in SHARED_EXPERT_FIELDS:  # dots1 multiplies by it
            return 1
        return None
    if not isinstance(value, int):
        return None
    if key in TINY_INTEGERS:
        return TINY_INTEGERS[key]
    if is_head_width(key):  # scaled alike, so equalities and sums between them hold (qk = nope + rope)
        return max(2, value // HEAD_DIM_DIVISOR) if value % (2 * HEAD_DIM_DIVISOR) == 0 else value
    if key.endswith("intermediate_size"):
        return 0 if value == 0 else (128 if key == "intermediate_size" else 32)
    if key in EXPERT_COUNT_FIELDS:
        return min(max(value, 4), 8)
    if key in TOP_K_FIELDS:
        return min(value, 2)
    if key in GROUP_FIELDS:
        return 2 if value > 1 else 1
    if key == "topk_group":
        return 1
    if key == "num_key_value_heads":
        return HEADS if value == fields.get("num_attention_heads") else (1 if value == 1 else 2)
    if key in ("mamba_n_heads", "mamba_num_heads"):
        return 8
    return None


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


def shrunk_override(override, fields: dict):
    """A per-layer override ({"num_attention_heads": 64, ...}) with the same rules applied."""
    if not isinstance(override, dict):
        return override
    context = fields | override  # (a layer's kv heads compare with that layer's heads)
    shrunk = {key: tiny_integer(key, value, context) for key, value in override.items()}
    return {key: value if shrunk[key] is None else shrunk[key] for key, value in override.items()}


def shrunk_fields(default) -> tuple[dict, str]:
    """Constructor arguments that make the family's default config `default` tiny, and a short
    description of the layers kept."""
    fields = default.to_dict()
    layers = fields.get("num_hidden_layers")
    tiny: dict = {}
    for key, value in fields.items():
        small = tiny_integer(key, value, fields)
        if small is not None:
            tiny[key] = small
        elif key in MOE_SWITCHES and value is False:
            tiny[key] = True
    expand = fields.get("mamba_expand", 2)
    for heads, head_dim in (("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim")):
        if head_dim in fields and isinstance(fields[head_dim], int):
            tiny[head_dim] = expand * HIDDEN // tiny.get(heads, 8)
    tiny.update(token_id_fields(fields, VOCAB))
    tiny["initializer_range"] = 0.2  # as multimoe.testing: logits of a random model then mean something

    # Layers: per-layer lists are cut to a selection covering every kind of layer; patterns given
    # by index (the first k dense, every n-th sparse, ...) are rewritten for the layers kept.
    if isinstance(layers, int):
        per_layer = {
            key: value
            for key, value in fields.items()
            if isinstance(value, list) and len(value) == layers and layers > 1 and key != "architectures"
        }
        keep = layer_selection(per_layer) if per_layer else list(range(MIN_LAYERS))
        tiny["num_hidden_layers"] = len(keep)
        for key, value in per_layer.items():  # (per-layer sizes, e.g. heads per layer, shrunk too)
            per_key = key.removesuffix("_per_layer")
            tiny[key] = [
                value[index] if tiny_integer(per_key, value[index], fields) is None
                else tiny_integer(per_key, value[index], fields)
                for index in keep
            ]
        for key, value in fields.items():  # per-layer overrides keyed by layer index ("02": {...})
            if isinstance(value, dict) and value and all(isinstance(k, str) and re.fullmatch(r"\d+", k) for k in value):
                width = len(next(iter(value)))
                tiny[key] = {
                    str(new).zfill(width): shrunk_override(value[old], fields)
                    for new, index in enumerate(keep)
                    for old in value
                    if int(old) == index
                }
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
        for period, offset in (("attn_layer_period", "attn_layer_offset"),
                               ("expert_layer_period", "expert_layer_offset")):
            if isinstance(fields.get(period), int) and isinstance(fields.get(offset), int):
                tiny[period], tiny[offset] = 2, 1
        if "max_window_layers" in fields and isinstance(fields["max_window_layers"], int):
            tiny["max_window_layers"] = len(keep)
        description = f"layers {keep} of {layers}" if per_layer else f"{len(keep)} layers"
    else:
        description = "the default's layer layout"
    return tiny, description


def shrink(config_class, model_type: str):
    """The tiny config of a family (the built-in ones: `multimoe.testing.tiny_config`)."""
    import multimoe.testing

    if model_type in multimoe.testing.TINY_FIELDS:
        return multimoe.testing.tiny_config(model_type), "multimoe.testing.tiny_config"
    default = config_class()
    fields, description = shrunk_fields(default)
    gaps = DEFAULT_GAPS.get(default.model_type)
    if gaps is not None:
        filled = gaps(fields)
        fields |= filled
        description += f"; filled what the default leaves unset: {', '.join(sorted(filled))}"
    return config_class(**fields), f"generic shrink, {description}"


# -- one family, in its own interpreter ----------------------------------------------------------


def sparse_block_of_layers(family, config) -> tuple[str, str] | str | None:
    """(sparse block attribute, experts attribute) of the family's decoder layers: the child of a
    layer holding a child of a decorated experts class. A string when the experts sit elsewhere
    (where the `Family` adapter has no way to point), None when no layer holds any."""
    import torch

    found, direct = set(), set()
    with torch.device("meta"):  # the base model's own layers (whatever their classes)
        layers = family.base_model_class(config).layers
        for layer in layers:
            for name, child in layer.named_children():
                if is_fused_experts_class(type(child)):
                    direct.add(name)
                for inner, grandchild in child.named_children():
                    if is_fused_experts_class(type(grandchild)):
                        found.add((name, inner))
    if direct:
        return (f"the decoder layer holds its experts directly (`{sorted(direct)[0]}`), not in a sparse block: "
                "the `Family` adapter names a sparse block child and its experts child")
    if len(found) > 1:
        return f"the decoder layers hold fused experts in several places: {sorted(found)}"
    return found.pop() if found else None


def decoder_layer_mismatch(family, config) -> str | None:
    """Where the family's base model's layers are not `family.decoder_layer_class` (multimoe takes
    the first of the base model's `_no_split_modules`), what that is."""
    import torch

    with torch.device("meta"):
        model = family.base_model_class(config)
    layers = getattr(model, "layers", None)
    if layers is None or not len(layers):
        return None
    actual = sorted({type(layer).__name__ for layer in layers})
    if actual != [family.decoder_layer_class.__name__]:
        return (f"multimoe's Family.decoder_layer_class is {family.decoder_layer_class.__name__} (the first of "
                f"{family.base_model_class.__name__}._no_split_modules), but its layers are {', '.join(actual)}")
    return None


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
    if isinstance(error, (AttributeError, ValueError)) and "mixed-tenant batch" in str(error):
        return "refused"  # RowDispatch's refusal of a tensor read directly; GroupCache's of recurrent state
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
    message = re.sub(r" object at 0x[0-9a-f]+", " object", " ".join(str(error).split()))  # stable across runs
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
    config_type = family.config_class.model_type
    if config_type != model_type:  # e.g. sarvam_moe's causal LM is Glm4MoeForCausalLM
        return finish(row, notes, f"not tried: an alias: its causal LM's config has model_type `{config_type}` "
                                  f"(what multimoe reads from a checkpoint); see that row")

    try:
        config, how = shrink(family.config_class, model_type)
    except Exception as error:  # noqa: BLE001
        return finish(row, notes, f"not tried: config could not be shrunk ({summary(error)})")
    notes.append(f"config: {how}")
    config._attn_implementation = "eager"

    if not builtin:
        try:
            with torch.device("meta"):
                has_layers = hasattr(family.base_model_class(config), "layers")
        except Exception as error:  # noqa: BLE001
            return finish(row, notes, f"not tried: the base model could not be built ({summary(error)})")
        if not has_layers:
            return finish(row, notes, f"not tried: {family.base_model_class.__name__} has no decoder `layers` "
                                      f"(a composite model, {family.causal_lm_class.__name__})")
        try:
            mismatch = decoder_layer_mismatch(family, config)
        except Exception as error:  # noqa: BLE001
            return finish(row, notes, f"not tried: the base model could not be built ({summary(error)})")
        if mismatch:
            notes.append(mismatch)
        try:
            located = sparse_block_of_layers(family, config)
        except Exception as error:  # noqa: BLE001
            return finish(row, notes, f"not tried: the base model could not be built ({summary(error)})")
        if located is None:
            return finish(row, notes,
                          "not tried: no decoder layer holds a fused experts module (no sparse block found)")
        if isinstance(located, str):
            return finish(row, notes, f"not tried: {located}")
        sparse_block, experts = located
        options = {"sparse_block": sparse_block} | ({"experts": experts} if experts != "experts" else {})
        family = Family(model_type, **options)
        row["registered"] = "generic adapter (" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"
        try:
            multimoe.register_family(family)
        except Exception as error:  # noqa: BLE001
            return finish(row, notes, f"{classify(error)}: register_family: {summary(error)}")

    step = "build the models"
    try:
        base = random_model(config, seed=0)
        if not any(is_fused_experts_class(type(module)) for module in base.modules()):
            return finish(row, notes, "not tried: the causal LM holds no fused experts module")
        tuned = fine_tune(base, seed=1, changed_experts=[1])
        owners = {"a": base, "b": tuned}
        step = "from_models"
        model = multimoe.from_models(owners).eval()
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, config.vocab_size, (2, PROMPT_LENGTH), generator=generator)
        greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)

        step = "one tenant per call: logits"
        with torch.no_grad():
            differences = {name: max_difference(model(ids, tenant=name).logits, own(ids).logits)
                           for name, own in owners.items()}
        notes.append("max |logit diff| " + ", ".join(f"{k} {v:.1e}" for k, v in differences.items()))
        if not max(differences.values()) <= TOLERANCE:
            return finish(row, notes, f"fails: {step}: {wrong_logits(differences)}")
        step = "one tenant per call: greedy generation"
        for name, own in owners.items():
            if not torch.equal(own.generate(ids[:1], **greedy), model.generate(ids[:1], tenant=name, **greedy)):
                return finish(row, notes, f"fails: {step}: tenant {name}'s tokens differ")
        notes.append(f"one tenant per call: logits and greedy {NEW_TOKENS} tokens equal")

        step = "mixed batch: logits"
        with torch.no_grad():
            mixed = model(ids, tenant_names=["b", "a"]).logits
            differences = {
                f"mixed row {row_idx} ({name})": max_difference(
                    mixed[row_idx], owners[name](ids[row_idx : row_idx + 1]).logits[0]
                )
                for row_idx, name in enumerate(["b", "a"])
            }
        if not max(differences.values()) <= TOLERANCE:
            return finish(row, notes, f"fails: {step}: {wrong_logits(differences)}")
        notes.append(f"mixed max |logit diff| {max(differences.values()):.1e}")
        step = "mixed batch: greedy generation"
        got = model.generate(ids, tenant_names=["b", "a"], **greedy)
        for row_idx, name in enumerate(["b", "a"]):
            expected = owners[name].generate(ids[row_idx : row_idx + 1], **greedy)
            eos = owners[name].generation_config.eos_token_id
            if new_tokens(expected[0], eos) != new_tokens(got[row_idx], eos):  # a finished row is padded
                return finish(row, notes, f"fails: {step}: row {row_idx} ({name})'s tokens differ")
        notes.append("mixed greedy equal")
        return finish(row, notes, "works")
    except Exception as error:  # noqa: BLE001
        kind = classify(error)
        if isinstance(error, multimoe.IncompatibleTenantsError) and base.config.to_dict() == tuned.config.to_dict():
            kind = "fails"  # the tenants' configs are equal: not a refusal but a wrong comparison
            notes.append("the two tenants' configs are equal (to_dict)")
        return finish(row, notes, f"{kind}: {step}: {summary(error)}")


def wrong_logits(differences: dict[str, float]) -> str:
    bad = {k: v for k, v in differences.items() if not v <= TOLERANCE}
    return "wrong logits (" + ", ".join(f"{k}: max |diff| {v:.2e}" for k, v in bad.items()) + f" > {TOLERANCE:g})"


def finish(row: dict, notes: list[str], result: str) -> dict:
    row["result"] = result
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
    parser.add_argument("--no-write", action="store_true",
                        help="print the table, leave docs/families.md alone (always so with --only)")
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
    from multimoe.families import FAMILIES

    rows = []
    for model_type, class_name, _ in families:
        row = run_family(model_type, args.timeout) | {"model_type": model_type, "class_name": class_name}
        if not row["registered"] and model_type in FAMILIES:  # (a worker that timed out or crashed)
            row["registered"] = "built-in"
        rows.append(row)
        print(f"{model_type:24s} {row['seconds']:6.1f} s  {row['result']}", flush=True)
    print()
    print(table(rows))
    if args.only:  # the table in the docs lists every family: only a full run rewrites it
        print(f"\n(--only: {DOC.relative_to(ROOT)} left as it is)")
    elif not args.no_write:
        command = "python scripts/family_table.py" + (f" --timeout {args.timeout:g}" if args.timeout != 60 else "")
        write_table(rows, command)
        print(f"\nwrote the table into {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
