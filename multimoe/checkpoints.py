"""Reading checkpoints: tenant sources (loaded models, local directories, Hub repo ids, in either
expert layout) and saved multi-tenant checkpoints.

Every tenant is presented in one vocabulary, the transformers v5 `MixtralForCausalLM` parameter
names with fused experts (`model.layers.N.mlp.experts.gate_up_proj` [E, 2I, H] and `down_proj`
[E, H, I]). Directories are read lazily through `safe_open`, one tensor at a time, so building a
multi-tenant model never holds N full source models in memory. Pickle files are never loaded.

`strict_from_pretrained` wraps transformers' loading of a saved multi-tenant checkpoint so that
what transformers would accept quietly (a corrupt shard, an integer tensor cast to float, a
tensor of the wrong shape initialised at random, NaN weights, a config.json with a key given
twice) is refused with the file, tensor or key named.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError, safe_open
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .alignment import realign

TenantSource = Union[str, os.PathLike, PreTrainedModel]

LEGACY_MOE_PREFIX = ".block_sparse_moe."
FUSED_MOE_PREFIX = ".mlp."

# Fields that must agree for tenants to share one expert pool and one forward.
COMPATIBILITY_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_local_experts",
    "num_experts_per_tok",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "sliding_window",
)


class IncompatibleTenantsError(ValueError):
    """Tenants whose shapes or settings differ cannot share one multi-tenant model."""


class CheckpointError(ValueError):
    """A tenant checkpoint is missing, unreadable, or does not match its own config."""


def is_expert_key(name: str) -> bool:
    return ".mlp.experts." in name


def fused_expert_keys(layer_idx: int) -> tuple[str, str]:
    prefix = f"model.layers.{layer_idx}.mlp.experts"
    return f"{prefix}.gate_up_proj", f"{prefix}.down_proj"


class TenantCheckpoint:
    """A read-only, lazy view of one Mixtral checkpoint in v5 fused naming."""

    def __init__(self, label: str, config: MixtralConfig, tensors: Mapping[str, torch.Tensor] | None, files=None):
        self.label = label
        self.config = config
        self._tensors = tensors
        self._files = files

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def open(cls, source: TenantSource, *, tenant: str, revision: str | None = None) -> TenantCheckpoint:
        """Open `source` without reading any weight yet (only the config and the file index)."""
        if isinstance(source, PreTrainedModel):
            if not isinstance(source, MixtralForCausalLM):
                raise CheckpointError(
                    f"Tenant {tenant!r}: expected a MixtralForCausalLM, got {type(source).__name__}."
                )
            state = dict(source.state_dict())
            return cls(source.name_or_path or type(source).__name__, source.config, state)
        if not isinstance(source, (str, os.PathLike)):
            raise CheckpointError(
                f"Tenant {tenant!r}: a source must be a MixtralForCausalLM, a local directory or a Hub repo id, "
                f"got {type(source).__name__}."
            )
        directory = resolve_directory(str(source), tenant=tenant, revision=revision)
        config = read_config(directory, tenant=tenant)
        return cls(str(source), config, None, SafetensorsFiles(directory, owner=f"Tenant {tenant!r}"))

    # -- access -------------------------------------------------------------------------------

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.tie_word_embeddings)

    def names(self) -> Iterator[str]:
        """Parameter names in v5 naming; legacy per-expert keys appear as the two fused names."""
        keys = self._tensors.keys() if self._tensors is not None else self._files.keys()
        seen = set()
        for key in keys:
            name = key.replace(LEGACY_MOE_PREFIX, FUSED_MOE_PREFIX)
            if is_expert_key(name):
                layer_idx = int(name.split(".")[2])
                for fused in fused_expert_keys(layer_idx):
                    if fused not in seen:
                        seen.add(fused)
                        yield fused
            elif name not in seen:
                seen.add(name)
                yield name

    def tensor(self, name: str) -> torch.Tensor:
        """One non-expert tensor by its v5 name; a tied lm_head reads the embedding matrix."""
        if name == "lm_head.weight" and self.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        if self._tensors is not None:
            return self._tensors[name]
        return self._files.get(name, legacy=name.replace(FUSED_MOE_PREFIX, LEGACY_MOE_PREFIX))

    def experts(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's experts as fused `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]."""
        gate_up_key, down_key = fused_expert_keys(layer_idx)
        if self._tensors is not None:
            return self._tensors[gate_up_key], self._tensors[down_key]
        if gate_up_key in self._files:
            return self._files.get(gate_up_key), self._files.get(down_key)
        prefix = f"model.layers.{layer_idx}.block_sparse_moe.experts"
        experts = range(self.config.num_local_experts)
        gate_up = torch.stack(
            [
                torch.cat([self._files.get(f"{prefix}.{e}.w1.weight"), self._files.get(f"{prefix}.{e}.w3.weight")])
                for e in experts
            ]
        )
        down = torch.stack([self._files.get(f"{prefix}.{e}.w2.weight") for e in experts])
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


class SafetensorsFiles:
    """Key -> file index over a directory's safetensors shards; tensors are read on demand.

    Opening checks what the headers alone can tell, before any tensor is read: every shard lies in
    the directory and parses, and every tensor is floating point. `owner` starts each error message
    ("Tenant 'chat'", "Multi-tenant checkpoint"). Each read maps its shard only for that read, so
    pages already read do not stay resident in this process.
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
        for file_name in files:
            path = directory / file_name
            if path.resolve().parent != directory.resolve():
                raise CheckpointError(f"{owner}: shard {file_name!r} lies outside {directory}.")
            try:
                with safe_open(str(path), framework="pt") as handle:
                    self.check_floating(handle, file_name)
                    keys = list(handle.keys())
            except (OSError, SafetensorError) as error:
                raise CheckpointError(f"{owner}: cannot read {path}: {error}") from error
            self._paths[file_name] = str(path)
        if weight_map is None:
            weight_map = dict.fromkeys(keys, weights_name)
        self._weight_map = weight_map

    def check_floating(self, handle, file_name: str) -> None:
        """Refuse integer or bool tensors from the headers: a loader would cast them to float silently."""
        for key in handle.keys():
            dtype = handle.get_slice(key).get_dtype()
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


def resolve_directory(source: str, *, tenant: str, revision: str | None) -> Path:
    """A local directory as is; anything else is a Hub repo id fetched (or found in the cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        snapshot = snapshot_download(source, revision=revision, allow_patterns=["*.json", "*.safetensors"])
    except (HFValidationError, OSError, ValueError) as error:
        raise CheckpointError(
            f"Tenant {tenant!r}: {source!r} is neither a local directory nor a Hub repo that could be "
            f"fetched or found in the cache ({type(error).__name__}: {error})."
        ) from error
    return Path(snapshot)


def read_config(directory: Path, *, tenant: str) -> MixtralConfig:
    raw = read_json(directory / "config.json", owner=f"Tenant {tenant!r}")
    model_type = raw.get("model_type")
    if model_type != MixtralConfig.model_type:
        raise CheckpointError(
            f"Tenant {tenant!r}: {directory} holds a {model_type!r} model; tenants must be Mixtral checkpoints."
        )
    return MixtralConfig.from_pretrained(directory)


def check_saved_directory(directory: Path, *, variant: str | None = None) -> None:
    """What can be refused in a saved multi-tenant checkpoint before transformers reads a weight:
    a config.json with a key given twice, a shard that is missing, corrupt or outside the
    directory, a non-floating tensor, and pickle-only weights."""
    owner = "Multi-tenant checkpoint"
    read_json(directory / "config.json", owner=owner)
    SafetensorsFiles(directory, owner=owner, variant=variant)


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
    """`load` (transformers' `from_pretrained`), refusing with a `CheckpointError` what it would
    otherwise accept: tensors missing (initialised at random), unexpected, or of the wrong shape
    (initialised at random with `ignore_mismatched_sizes`), NaN/Inf weights, and, for a local
    directory before any weight is read, what `check_saved_directory` refuses. Pickle weights are
    never loaded (`use_safetensors=True`).
    """
    wants_loading_info = kwargs.pop("output_loading_info", False)
    if pretrained_model_name_or_path is not None and os.path.isdir(pretrained_model_name_or_path):
        directory = Path(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        check_saved_directory(directory, variant=kwargs.get("variant"))
    kwargs |= {"use_safetensors": True, "ignore_mismatched_sizes": True, "output_loading_info": True}
    model, loading_info = load(pretrained_model_name_or_path, *model_args, **kwargs)
    for problem in ("missing_keys", "unexpected_keys"):
        keys = sorted(loading_info[problem])
        if keys:
            raise CheckpointError(
                f"The checkpoint does not match its config: {problem.replace('_', ' ')} {keys[:5]}"
                f"{' and more' if len(keys) > 5 else ''}."
            )
    if loading_info["mismatched_keys"]:
        key, found, expected = sorted(loading_info["mismatched_keys"])[0]
        raise CheckpointError(
            f"The checkpoint does not match its config: tensor {key!r} has shape {list(found)}, the config "
            f"implies {list(expected)}."
        )
    check_finite(model.named_parameters())
    realign(model)
    return (model, loading_info) if wants_loading_info else model



def effective(config: MixtralConfig, field: str):
    if field == "head_dim":
        return config.head_dim or config.hidden_size // config.num_attention_heads
    return getattr(config, field)


def check_compatible(configs: Mapping[str, MixtralConfig]) -> None:
    """Raise on the first setting in which a tenant's config differs from the first tenant's."""
    (reference_name, reference), *others = configs.items()
    for name, config in others:
        for field in COMPATIBILITY_FIELDS:
            expected, found = effective(reference, field), effective(config, field)
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
    "strict_from_pretrained",
]
