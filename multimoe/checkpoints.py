"""Reading checkpoints: tenant sources (loaded models, local directories, Hub repo ids, in either
expert layout) and saved multi-tenant checkpoints.

Every tenant is presented in one vocabulary, its family's transformers v5 parameter names with
fused experts (e.g. `model.layers.N.mlp.experts.gate_up_proj` [E, 2I, H] and `down_proj`
[E, H, I]; the family's adapter, `multimoe.families`, says where the experts sit). Directories are read lazily through `safe_open`, one tensor at a time, so building a
multi-tenant model never holds N full source models in memory. Pickle files are never loaded.

`strict_from_pretrained` wraps transformers' loading of a saved multi-tenant checkpoint so that
what transformers would accept quietly (a corrupt shard, an integer tensor cast to float, a
tensor of the wrong shape initialised at random, NaN weights, a config.json with a key given
twice) is refused with the file, tensor or key named; `check_saved_directory` refuses from the
config and the headers alone what would not load, before anything is allocated.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, GenerationConfig, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import GENERATION_CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .alignment import realign
from .families import EXPERT_COUNT_FIELDS, Family, family_for, routed_experts

TenantSource = Union[str, os.PathLike, PreTrainedModel]

# Legacy per-expert names use indices as transformers writes them (no leading zeros, so no two alias).
INDEX = r"(?:0|[1-9]\d*)"

# Config fields that may differ between tenants: provenance, token ids (each tenant's generation
# config carries its own), output switches, initialisation, and the settings `shared_settings`
# resolves. Every other field must agree for tenants to share one pool and one forward.
PER_TENANT_FIELDS = frozenset(
    {
        "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "auto_map",
        "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
        "tie_word_embeddings", "max_position_embeddings", "use_cache", "initializer_range",
        "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
        "tokenizer_class", "task_specific_params", "chunk_size_feed_forward", "router_aux_loss_coef",
        "output_router_logits", "router_jitter_noise", "attention_dropout",
    }
)
# Fields no v5 MoE family's modeling code reads: their effect, where they have one, is already in
# `sliding_window` / `layer_types` (derived from them by the config), which are compared.
INERT_FIELDS = frozenset({"max_window_layers", "use_sliding_window", "pretraining_tp"})
# Compared first, in this order, so that the usual mismatches are named as they always were.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    *EXPERT_COUNT_FIELDS,
    "num_experts_per_tok",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


SAVED_CHECKPOINT = "Multi-tenant checkpoint"  # how errors about a saved checkpoint start


class IncompatibleTenantsError(ValueError):
    """Tenants whose shapes or settings differ cannot share one multi-tenant model."""


class CheckpointError(ValueError):
    """A tenant checkpoint is missing, unreadable, or does not match its own config."""


class TenantCheckpoint:
    """A read-only, lazy view of one tenant checkpoint of a registered family, in v5 fused naming."""

    def __init__(
        self,
        label: str,
        config: PreTrainedConfig,
        tensors: Mapping[str, torch.Tensor] | None,
        files=None,
        generation_source: GenerationConfig | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        self.label = label
        self.config = config
        self.family: Family = family_for(config.model_type, owner=label)
        self._tensors = tensors
        self._files = files
        self.generation_source = generation_source
        self.tokenizer = tokenizer  # the source's own, where its directory has one (see `read_tokenizer`)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def open(cls, source: TenantSource, *, tenant: str, revision: str | None = None) -> TenantCheckpoint:
        """Open `source` without reading any weight yet (only the config, the file index and the
        tokenizer, where a directory has one)."""
        if isinstance(source, PreTrainedModel):
            family = family_for(getattr(source.config, "model_type", None), owner=f"Tenant {tenant!r}")
            if type(source) is not family.model_class:
                raise CheckpointError(
                    f"Tenant {tenant!r}: expected a {family.model_class.__name__} (the {family.model_type} model "
                    f"with its head), got {type(source).__name__}."
                )
            check_not_quantized(source, owner=f"Tenant {tenant!r}")
            state = dict(source.state_dict())
            return cls(source.name_or_path or type(source).__name__, source.config, state,
                       generation_source=source.generation_config)
        if not isinstance(source, (str, os.PathLike)):
            raise CheckpointError(
                f"Tenant {tenant!r}: a source must be a model of a supported MoE family, a local directory or a "
                f"Hub repo id, got {type(source).__name__}."
            )
        directory = resolve_directory(str(source), owner=f"Tenant {tenant!r}", revision=revision)
        config = read_config(directory, tenant=tenant)
        tokenizer = read_tokenizer(directory, owner=f"Tenant {tenant!r}")
        method = quantization_method(config)
        if method is not None:
            dequantized = dequantize(directory, config, method, owner=f"Tenant {tenant!r}")
            return cls(str(source), dequantized.config, dict(dequantized.state_dict()),
                       generation_source=dequantized.generation_config, tokenizer=tokenizer)
        return cls(str(source), config, None, SafetensorsFiles(directory, owner=f"Tenant {tenant!r}"),
                   tokenizer=tokenizer)

    # -- access -------------------------------------------------------------------------------

    @cached_property
    def tie_word_embeddings(self) -> bool:
        """Whether the source computes its logits with its embedding matrix, whatever its config
        says. A loaded model does when its lm_head is the embedding tensor. A directory does when
        its config ties and it stores no lm_head, or one equal to the embedding: with other values,
        transformers leaves the two untied and uses the stored lm_head."""
        embedding_key = self.family.embedding_key
        if self._tensors is not None:
            head, embedding = self._tensors["lm_head.weight"], self._tensors[embedding_key]
            return head.data_ptr() == embedding.data_ptr() and head.shape == embedding.shape
        if not self.config.tie_word_embeddings or "lm_head.weight" not in self._files:
            return bool(self.config.tie_word_embeddings)
        return torch.equal(self._files.get("lm_head.weight"), self._files.get(embedding_key))

    @cached_property
    def dtype(self) -> torch.dtype | None:
        """The dtype most of the source's weights are in (by element count), read from the
        tensors or the headers: what the source computes in, whatever its config says."""
        if self._tensors is not None:
            found = ((tensor.dtype, tensor.numel()) for tensor in self._tensors.values())
        else:
            found = ((self._files.dtypes[key], math.prod(self._files.shapes[key])) for key in self._files.keys())
        counts = Counter()
        for dtype, numel in found:
            if dtype is not None and dtype.is_floating_point:
                counts[dtype] += numel
        return counts.most_common(1)[0][0] if counts else None

    @cached_property
    def device(self) -> torch.device:
        """Where a loaded model's weights lie, when all on one device; the CPU for files (and for a
        model split over devices)."""
        return one_device(tensor.device for tensor in (self._tensors or {}).values())

    @cached_property
    def generation_config(self) -> GenerationConfig:
        """The source's generation settings: a loaded model's own, a directory's
        generation_config.json, else the defaults transformers derives from its config."""
        if self._tensors is not None:
            return copy.deepcopy(self.generation_source or GenerationConfig.from_model_config(self.config))
        path = self._files.directory / GENERATION_CONFIG_NAME
        if not path.is_file():
            return GenerationConfig.from_model_config(self.config)
        try:
            return GenerationConfig.from_pretrained(self._files.directory)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{self._files.owner}: cannot read {path}: {error}") from error

    @cached_property
    def expert_parameters(self) -> tuple[str, ...]:
        """The names of the experts' tensors in the family's fused layout (e.g. gate_up_proj, down_proj)."""
        return self.family.expert_parameter_names(self.config)

    @cached_property
    def layer_expert_keys(self) -> list[tuple[str, ...] | None]:
        return self.family.expert_keys(self.config)

    def expert_keys(self, layer_idx: int) -> tuple[str, ...]:
        """The names multimoe reads layer `layer_idx`'s stacked experts by (see `Family.expert_keys`)."""
        return self.layer_expert_keys[layer_idx]

    @cached_property
    def tied_aliases(self) -> dict[str, str]:
        """The family's names that read another tensor when this tenant ties its embeddings
        (lm_head; Switch's encoder and decoder embeddings too)."""
        return dict(self.family.model_class._tied_weights_keys) if self.tie_word_embeddings else {}

    def names(self) -> list[str]:
        """Parameter names in v5 naming, each once; legacy per-expert keys appear as the fused names."""
        keys = self._tensors.keys() if self._tensors is not None else self._files.keys()
        return list(dict.fromkeys(name for key in keys for name in self.v5_names(key)))

    @cached_property
    def legacy_patterns(self) -> tuple[re.Pattern, re.Pattern] | None:
        """(per-expert weight, router) names of the family's legacy layout, when it has one."""
        legacy = self.family.legacy
        if legacy is None:
            return None
        layer = rf"model\.layers\.(?P<layer>{INDEX})\.{re.escape(legacy.block)}"
        projections = "|".join(re.escape(name) for name in (legacy.gate, legacy.up, legacy.down))
        expert = re.compile(rf"{layer}\.{re.escape(self.family.experts)}\.(?P<expert>{INDEX})\.(?:{projections})\.weight")
        renamed = f".{legacy.block}." != f".{self.family.sparse_block}."
        router = re.compile(rf"{layer}\.(?P<rest>gate\.weight)") if renamed else None
        return expert, router

    def v5_names(self, key: str) -> tuple[str, ...]:
        """What a stored key stands for in v5 naming. Only exact legacy names are translated (a
        per-expert weight of an expert this config has, a router); any other key stands for itself,
        so that a stray tensor is refused by its own name instead of vanishing into a fused one."""
        if self.family.per_expert_modules:
            return (self.family.stacked_name(self.config, key),)
        if self.legacy_patterns is None:
            return (key,)
        expert_pattern, router_pattern = self.legacy_patterns
        expert = expert_pattern.fullmatch(key)
        if (
            expert
            and int(expert["layer"]) < self.config.num_hidden_layers
            and int(expert["expert"]) < self.num_experts
        ):
            return self.expert_keys(int(expert["layer"]))
        router = router_pattern.fullmatch(key) if router_pattern is not None else None
        if router:
            return (f"model.layers.{router['layer']}.{self.family.sparse_block}.{router['rest']}",)
        return (key,)

    @property
    def num_experts(self) -> int:
        return routed_experts(self.config)

    def tensor(self, name: str) -> torch.Tensor:
        """One non-expert tensor by its v5 name; a tied lm_head reads the embedding matrix."""
        name = self.tied_aliases.get(name, name)
        if self._tensors is not None:
            return self._tensors[name]
        legacy = self.family.legacy
        if legacy is None:
            return self._files.get(name)
        return self._files.get(name, legacy=name.replace(f".{self.family.sparse_block}.", f".{legacy.block}.", 1))

    def experts(self, layer_idx: int) -> tuple[torch.Tensor, ...]:
        """The layer's experts in the family's fused layout, one tensor per expert parameter."""
        keys = self.expert_keys(layer_idx)
        if self.family.per_expert_modules:
            stored = self._tensors.__getitem__ if self._tensors is not None else self._files.get
            return self.family.read_experts(self.config, layer_idx, stored)
        if self._tensors is not None:
            return tuple(self._tensors[key] for key in keys)
        if keys[0] in self._files:
            return tuple(self._files.get(key) for key in keys)
        legacy = self.family.legacy
        if legacy is None or self.expert_parameters != ("gate_up_proj", "down_proj"):
            return tuple(self._files.get(key) for key in keys)  # refused as missing, by name
        prefix = f"model.layers.{layer_idx}.{legacy.block}.{self.family.experts}"
        experts = range(self.num_experts)
        gate_up = torch.stack(
            [
                torch.cat(
                    [self._files.get(f"{prefix}.{e}.{legacy.gate}.weight"), self._files.get(f"{prefix}.{e}.{legacy.up}.weight")]
                )
                for e in experts
            ]
        )
        down = torch.stack([self._files.get(f"{prefix}.{e}.{legacy.down}.weight") for e in experts])
        return gate_up, down


def with_variant(file_name: str, variant: str | None) -> str:
    """transformers' naming of variant weights: `model.safetensors` -> `model.<variant>.safetensors`."""
    if variant is None:
        return file_name
    stem, suffix = file_name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads keeps the last of two equal keys; in a hand-edited file the first may be the one meant."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears more than once")
        seen.add(key)
    return dict(pairs)


def read_json(path: Path, *, owner: str) -> dict:
    try:
        return json.loads(path.read_text(), object_pairs_hook=reject_duplicate_keys)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{owner}: cannot read {path}: {error}") from error


# The floating dtypes a safetensors header names.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class SafetensorsFiles:
    """Key -> file index over a directory's safetensors shards; tensors are read on demand.

    Opening checks what the headers alone can tell, before any tensor is read: every shard lies in
    the directory and parses, and every tensor is floating point; `shapes` keeps each tensor's shape
    from the headers. `owner` starts each error message ("Tenant 'chat'", "Multi-tenant
    checkpoint"). Each read maps its shard only for that read, so pages already read do not stay
    resident in this process.
    """

    def __init__(self, directory: Path, *, owner: str, variant: str | None = None):
        self.owner = owner
        self.directory = directory
        weights_name = with_variant(SAFE_WEIGHTS_NAME, variant)
        index_path = directory / with_variant(SAFE_WEIGHTS_INDEX_NAME, variant)
        if (directory / weights_name).is_file():  # before the index, as transformers' loader looks
            files, weight_map = [weights_name], None
        elif index_path.is_file():
            weight_map = read_json(index_path, owner=owner).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
                raise CheckpointError(f"{owner}: {index_path} is not a shard index (no weight_map of file names).")
            files = sorted(set(weight_map.values()))
        else:
            pickled = sorted(p.name for p in directory.glob("*.bin"))
            hint = f" Found {pickled}, which are pickle files and are never loaded." if pickled else ""
            raise CheckpointError(f"{owner}: no safetensors weights in {directory}.{hint}")
        self._paths = {}
        self.shapes: dict[str, list[int]] = {}
        self.dtypes: dict[str, torch.dtype | None] = {}
        for file_name in files:
            path = directory / file_name
            if path.resolve().parent != directory.resolve():
                raise CheckpointError(f"{owner}: shard {file_name!r} lies outside {directory}.")
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():
                        header = handle.get_slice(key)
                        dtype = header.get_dtype()
                        self.check_floating(key, dtype, file_name)
                        self.shapes[key] = header.get_shape()
                        self.dtypes[key] = SAFETENSORS_DTYPES.get(dtype)
            except (OSError, SafetensorError) as error:
                raise CheckpointError(f"{owner}: cannot read {path}: {error}") from error
            self._paths[file_name] = str(path)
        if weight_map is None:
            weight_map = dict.fromkeys(self.shapes, weights_name)
        self._weight_map = weight_map

    def check_floating(self, key: str, dtype: str, file_name: str) -> None:
        """Refuse integer or bool tensors from the headers: a loader would cast them to float silently."""
        if not dtype.startswith(("F", "BF")):
            raise CheckpointError(
                f"{self.owner}: tensor {key!r} in {file_name} has dtype {dtype}; weights must be floating."
            )

    def keys(self):
        return self._weight_map.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._weight_map

    def get(self, key: str, legacy: str | None = None) -> torch.Tensor:
        if key not in self._weight_map and legacy in self._weight_map:
            key = legacy
        if key not in self._weight_map:
            raise CheckpointError(f"{self.owner}: tensor {key!r} is missing from {self.directory}.")
        try:
            with safe_open(self._paths[self._weight_map[key]], framework="pt") as handle:
                return handle.get_tensor(key)
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{self.owner}: cannot read tensor {key!r}: {error}") from error


# What transformers' loading of a safetensors checkpoint fetches from the Hub: configs and weights.
HUB_DOWNLOAD_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
def one_device(devices: Iterable[torch.device]) -> torch.device:
    """The device all of `devices` lie on, else (several, or none) the CPU."""
    found = set(devices)
    return found.pop() if len(found) == 1 else torch.device("cpu")


# The files fetched from a Hub repo: configs, weights and tokenizers (*.json and, where a tokenizer
# has them, chat templates, sentencepiece models and vocabulary or merges lists), in any folder.
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]


def resolve_directory(source: str, *, owner: str, **hub_options) -> Path:
    """A local directory as is; anything else is a Hub repo id whose configs, safetensors and
    tokenizer files are fetched (or found in the cache), the files transformers would fetch to load
    it and its tokenizers."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    options = {key: value for key, value in hub_options.items() if key in HUB_DOWNLOAD_OPTIONS and value is not None}
    try:
        snapshot = snapshot_download(source, allow_patterns=HUB_FILE_PATTERNS, **options)
    except (HFValidationError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{owner}: {source!r} is neither a local directory nor a Hub repo that could be "
            f"fetched or found in the cache ({type(error).__name__}: {error})."
        ) from error
    return Path(snapshot)


def read_config(directory: Path, *, tenant: str) -> PreTrainedConfig:
    """A tenant directory's config, as its family's config class, refused before any weight is read
    when the family is not supported."""
    raw = read_json(directory / "config.json", owner=f"Tenant {tenant!r}")
    family = family_for(raw.get("model_type"), owner=f"Tenant {tenant!r} ({directory})")
    return family.config_class.from_pretrained(directory)


# A directory holds a tokenizer when it has one of these (the other files it needs are optional).
TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json")


def read_tokenizer(directory: Path, *, owner: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer (and chat template) saved in `directory`, or None when it holds no tokenizer
    files. Broken files are refused, not skipped: the model would then be served with another
    tokenizer, one that may not know its special tokens or its chat template."""
    if not any((directory / name).is_file() for name in TOKENIZER_MARKERS):
        return None
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as error:  # broken files fail in many ways; tokenizers raises a bare Exception
        raise CheckpointError(f"{owner}: cannot read the tokenizer in {directory}: {error}") from error


def quantization_method(config: PreTrainedConfig) -> str | None:
    quantization = getattr(config, "quantization_config", None)
    if not quantization:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, Mapping) else quantization.quant_method
    return str(getattr(method, "value", method))


def dequantizing_config(method: str):
    """transformers' config that dequantizes `method` on load, where it has one."""
    from transformers import FineGrainedFP8Config, Mxfp4Config

    return {"mxfp4": Mxfp4Config, "fp8": FineGrainedFP8Config}.get(method)


def dequantize(directory: Path, config: PreTrainedConfig, method: str, *, owner: str) -> PreTrainedModel:
    """The tenant's model with its quantized weights (gpt-oss in MXFP4, DeepSeek-V3 in FP8)
    dequantized on load by transformers, to the dtype of its other weights: the pool is built from
    and compared in the model's dtype. Held whole in memory, unlike an unquantized directory.
    Other quantizations are refused, naming the method."""
    quantizer = dequantizing_config(method)
    if quantizer is None:
        raise CheckpointError(
            f"{owner}: its weights are quantized ({method}), which transformers cannot dequantize on load; "
            "multimoe builds tenants from unquantized weights: dequantize them first."
        )
    model_class = family_for(config.model_type, owner=owner).model_class
    return model_class.from_pretrained(directory, quantization_config=quantizer(dequantize=True), dtype="auto")


def check_not_quantized(model: PreTrainedModel, *, owner: str) -> None:
    """Refuse a loaded model that still computes with quantized weights."""
    if getattr(model, "is_quantized", False):
        raise CheckpointError(
            f"{owner}: its weights are quantized ({quantization_method(model.config)}); multimoe builds tenants "
            "from unquantized weights. Load it dequantized (e.g. `quantization_config=Mxfp4Config(dequantize=True)` "
            "for MXFP4, `FineGrainedFP8Config(dequantize=True)` for FP8) or give its directory or Hub id."
        )


def check_saved_directory(directory: Path, model_class: type[PreTrainedModel], *, variant: str | None = None) -> None:
    """Refuse, from config.json and the safetensors headers alone, a saved checkpoint that would not
    load as `model_class` exactly: a config.json with a key given twice, of another model type or
    invalid; a shard that is missing, corrupt or outside the directory; pickle-only weights; a
    non-floating tensor; tensors missing, unexpected or misshapen for the config. No weight is
    read or allocated, so a config claiming a huge pool costs no memory before it is refused."""
    config = read_saved_config(directory, model_class)
    found = SafetensorsFiles(directory, owner=SAVED_CHECKPOINT, variant=variant).shapes
    found = {current_name(model_class.family, key): shape for key, shape in found.items()}
    implied = implied_shapes(model_class, config)
    prefix = f"{model_class.base_model_prefix}."
    if not any(key.startswith(prefix) for key in implied) and any(key.startswith(prefix) for key in found):
        # The base model loaded from a checkpoint of the model with its head: transformers strips the
        # prefix and leaves the head's tensors out.
        found = {key.removeprefix(prefix): shape for key, shape in found.items() if key.startswith(prefix)}
    both = implied.keys() & found.keys()
    check_matches_config(
        f"{SAVED_CHECKPOINT} {directory}",
        missing=implied.keys() - found.keys(),
        unexpected=found.keys() - implied.keys(),
        mismatched=[(key, found[key], implied[key]) for key in both if found[key] != list(implied[key])],
    )


def current_name(family: Family, saved: str) -> str:
    """A saved tensor's name in today's modules (the family's renames of earlier releases applied)."""
    for pattern, replacement in family.saved_renames:
        saved = re.sub(pattern, replacement, saved)
    return saved


def read_saved_config(directory: Path, model_class: type[PreTrainedModel]) -> PreTrainedConfig:
    """The checkpoint's config, refused if it is another model type's: transformers would build the
    model from it and fail deep inside with a bare TypeError."""
    model_type = read_json(directory / "config.json", owner=SAVED_CHECKPOINT).get("model_type")
    expected = model_class.config_class.model_type
    if model_type != expected:
        raise CheckpointError(
            f"{SAVED_CHECKPOINT}: {directory} holds a single {model_type!r} model, not a multi-tenant one "
            f"({expected!r}); build one from it with "
            f"{model_class.__name__}.from_models({{'name': {str(directory)!r}}})."
        )
    return model_class.config_class.from_pretrained(directory)


def implied_shapes(model_class: type[PreTrainedModel], config: PreTrainedConfig) -> dict[str, torch.Size]:
    """The shape of every tensor a saved `model_class` with `config` holds, measured on the meta
    device, which allocates nothing whatever sizes the config claims. Tied weights are left out:
    transformers saves only the tensor each is tied to."""
    with torch.device("meta"):
        model = model_class(config)
    tied = model.all_tied_weights_keys
    return {name: tensor.shape for name, tensor in model.state_dict().items() if name not in tied}


def check_matches_config(
    checkpoint: str,
    missing: Collection[str],
    unexpected: Collection[str],
    mismatched: Collection[tuple[str, Sequence[int], Sequence[int]]],
) -> None:
    """Refuse tensors missing, unexpected or misshapen (name, found shape, implied shape) for the
    config, naming the first few in sorted order, so that a checkpoint always gets the same message."""
    for problem, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
        keys = sorted(keys)
        if keys:
            raise CheckpointError(
                f"{checkpoint} does not match its config: {problem} {keys[:5]}{' and more' if len(keys) > 5 else ''}."
            )
    if mismatched:
        key, found, implied = min(mismatched)
        raise CheckpointError(
            f"{checkpoint} does not match its config: tensor {key!r} has shape {list(found)}, the config implies "
            f"{list(implied)}."
        )


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or Inf. `aminmax` propagates NaN and allocates no
    per-element mask, so a large pool is checked without a copy."""
    if not tensor.numel():
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) and torch.isfinite(high))


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse NaN or Inf weights by name; offloaded (meta) tensors are skipped."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not is_finite(tensor):
            raise CheckpointError(f"The checkpoint's tensor {name!r} contains NaN or Inf values.")


def strict_from_pretrained(
    load: Callable[..., tuple[PreTrainedModel, dict]],
    pretrained_model_name_or_path: str | os.PathLike | None,
    *model_args,
    **kwargs,
):
    """`load` (transformers' `from_pretrained` bound to the model class, as `super().from_pretrained`
    in an override is), refusing with a `CheckpointError` what it would otherwise accept.

    The checkpoint (a local directory, or a Hub repo fetched into the cache first) goes through
    `check_saved_directory`, which refuses from config.json and the headers, before any weight is
    read or allocated, tensors missing (initialised at random), unexpected (a stray lm_head of a
    tied tenant would untie it) or of the wrong shape (initialised at random with
    `ignore_mismatched_sizes`). Once loaded, the missing, unexpected and misshapen keys
    transformers reports and NaN/Inf weights are refused too. Pickle weights are never loaded
    (`use_safetensors=True`).
    """
    wants_loading_info = kwargs.pop("output_loading_info", False)
    if pretrained_model_name_or_path is not None:
        # A Hub repo is fetched first (into the cache transformers then loads from), so that it is
        # checked before anything is allocated, as a local directory is.
        snapshot = resolve_directory(str(pretrained_model_name_or_path), owner=SAVED_CHECKPOINT, **kwargs)
        check_saved_directory(snapshot / kwargs.get("subfolder", ""), load.__self__, variant=kwargs.get("variant"))
    kwargs |= {"use_safetensors": True, "ignore_mismatched_sizes": True, "output_loading_info": True}
    model, loading_info = load(pretrained_model_name_or_path, *model_args, **kwargs)
    unexpected = loading_info["unexpected_keys"]
    if model.base_model is model and type(model).__name__ not in (model.config.architectures or []):
        # The base model from a checkpoint of the model with its head: the head's tensors stay unread.
        unexpected = {key for key in unexpected if key.startswith(f"{model.base_model_prefix}.")}
    check_matches_config("The checkpoint", loading_info["missing_keys"], unexpected, loading_info["mismatched_keys"])
    check_finite(model.named_parameters())
    realign(model)
    return (model, loading_info) if wants_loading_info else model


def effective(config: PreTrainedConfig, values: Mapping, field: str):
    """A field's value as saved (`to_dict`: some families expose views without equality on the
    config object), and the head dimension as attention computes it when the config leaves it unset."""
    if field == "head_dim" and getattr(config, "num_attention_heads", None):
        return values.get("head_dim") or config.hidden_size // config.num_attention_heads
    return values.get(field, getattr(config, field, None))


def rope_type(config: PreTrainedConfig) -> str:
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_type", "default") if isinstance(parameters, Mapping) else "default"


def compared_fields(config: PreTrainedConfig) -> list[str]:
    """Every config field that must agree between tenants, the shape fields first. The one rotary
    embedding reads `max_position_embeddings` for every scaled rope (dynamic NTK, longrope, yarn),
    so it must agree there; with the default rope it only bounds the inputs."""
    fields = set(config.to_dict()) - PER_TENANT_FIELDS - INERT_FIELDS - {"model_type"}
    if rope_type(config) != "default":
        fields.add("max_position_embeddings")
    return [field for field in SHAPE_FIELDS if field in fields or field == "head_dim"] + sorted(
        fields - set(SHAPE_FIELDS)
    )


def check_compatible(configs: Mapping[str, PreTrainedConfig]) -> None:
    """Raise on the first setting in which a tenant's config differs from the first tenant's: the
    family, then every field except those each tenant may keep (`PER_TENANT_FIELDS`)."""
    (reference_name, reference), *others = configs.items()
    for name, config in others:
        if config.model_type != reference.model_type:
            raise IncompatibleTenantsError(
                f"Tenants {reference_name!r} and {name!r} are of different families: {reference.model_type!r} and "
                f"{config.model_type!r}; one model serves fine-tunes of one family."
            )
        reference_values, values = reference.to_dict(), config.to_dict()
        for field in compared_fields(reference):
            expected, found = effective(reference, reference_values, field), effective(config, values, field)
            if expected != found:
                raise IncompatibleTenantsError(
                    f"Tenants {reference_name!r} and {name!r} are incompatible: {field} is {expected!r} in "
                    f"{reference_name!r} but {found!r} in {name!r}."
                )


__all__ = [
    "CheckpointError",
    "IncompatibleTenantsError",
    "TenantCheckpoint",
    "TenantSource",
    "check_compatible",
    "check_finite",
    "check_saved_directory",
    "read_tokenizer",
    "strict_from_pretrained",
]
