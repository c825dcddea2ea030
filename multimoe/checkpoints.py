"""Reading tenants: loaded models, local directories and Hub repo ids, in either expert layout.

Every tenant is presented in one vocabulary, the transformers v5 `MixtralForCausalLM` parameter
names with fused experts (`model.layers.N.mlp.experts.gate_up_proj` [E, 2I, H] and `down_proj`
[E, H, I]). Directories are read lazily through `safe_open`, one tensor at a time, so building a
multi-tenant model never holds N full source models in memory. Pickle files are never loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError, safe_open
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel

TenantSource = Union[str, os.PathLike, PreTrainedModel]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
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
        return cls(str(source), config, None, SafetensorsFiles(directory, tenant=tenant))

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


class SafetensorsFiles:
    """Key -> file index over a directory's safetensors shards; tensors are read on demand."""

    def __init__(self, directory: Path, *, tenant: str):
        self.tenant = tenant
        self.directory = directory
        index_path = directory / SAFE_WEIGHTS_INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise CheckpointError(f"Tenant {tenant!r}: {index_path} is not a valid shard index ({error}).")
            files = sorted(set(weight_map.values()))
        elif (directory / SAFE_WEIGHTS_NAME).is_file():
            files, weight_map = [SAFE_WEIGHTS_NAME], None
        else:
            pickled = sorted(p.name for p in directory.glob("*.bin"))
            hint = f" Found {pickled}, which are pickle files and are never loaded." if pickled else ""
            raise CheckpointError(f"Tenant {tenant!r}: no safetensors weights in {directory}.{hint}")
        self._handles = {}
        for file_name in files:
            path = directory / file_name
            if path.resolve().parent != directory.resolve():
                raise CheckpointError(f"Tenant {tenant!r}: shard {file_name!r} lies outside {directory}.")
            try:
                self._handles[file_name] = safe_open(str(path), framework="pt")
            except (OSError, SafetensorError) as error:
                raise CheckpointError(f"Tenant {tenant!r}: cannot read {path}: {error}") from error
        if weight_map is None:
            weight_map = {key: SAFE_WEIGHTS_NAME for key in self._handles[SAFE_WEIGHTS_NAME].keys()}
        self._weight_map = weight_map

    def keys(self):
        return self._weight_map.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._weight_map

    def get(self, key: str, legacy: str | None = None) -> torch.Tensor:
        if key not in self._weight_map and legacy in self._weight_map:
            key = legacy
        if key not in self._weight_map:
            raise CheckpointError(f"Tenant {self.tenant!r}: tensor {key!r} is missing from {self.directory}.")
        try:
            return self._handles[self._weight_map[key]].get_tensor(key)
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"Tenant {self.tenant!r}: cannot read tensor {key!r}: {error}") from error


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
    config_path = directory / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"Tenant {tenant!r}: cannot read {config_path}: {error}") from error
    model_type = raw.get("model_type")
    if model_type != MixtralConfig.model_type:
        raise CheckpointError(
            f"Tenant {tenant!r}: {directory} holds a {model_type!r} model; tenants must be Mixtral checkpoints."
        )
    return MixtralConfig.from_pretrained(directory)


def effective(config: MixtralConfig, field: str):
    if field == "head_dim":
        return config.head_dim or config.hidden_size // config.num_attention_heads
    return getattr(config, field)


def check_compatible(checkpoints: Mapping[str, TenantCheckpoint]) -> None:
    """Raise on the first setting in which a tenant differs from the first tenant."""
    (reference_name, reference), *others = checkpoints.items()
    for name, checkpoint in others:
        for field in COMPATIBILITY_FIELDS:
            expected, found = effective(reference.config, field), effective(checkpoint.config, field)
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
]
