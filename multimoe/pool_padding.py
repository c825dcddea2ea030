"""Pools padded for expert parallelism, through transformers' own weight conversions.

transformers splits a layer's experts over the expert-parallel ranks evenly or not at all, and a
consolidated pool holds any number of entries. Loading with `ep_size` sets the config's
`pool_multiple`, so each pool is built with zero entries appended up to a multiple of the ranks;
no map points to them. Each rank reads only its own share of the checkpoint's pool (its last
ranks' shares come up short, or empty), and `PadPoolEntries` completes that share with zeros as it
is loaded. Saving runs the reverse, `DropPoolPadding`, on the gathered pool: checkpoints never hold
padding, and load on any number of ranks.
"""

from __future__ import annotations

import re

import torch
from torch.distributed.tensor import DTensor
from transformers.core_model_loading import ConversionOps, WeightConverter


LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def only_tensor(input_dict: dict) -> torch.Tensor:
    (tensors,) = input_dict.values()
    return tensors[0] if isinstance(tensors, list) else tensors


class PadPoolEntries(ConversionOps):
    """On load: this rank's share of a pool tensor, completed with zero entries up to the rows its
    parameter holds. Without padding (`pool_multiple` 1) the tensor passes as read, so a short pool
    still reaches transformers' shape check."""

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, *, full_layer_name, model, config, **kwargs):
        tensor = only_tensor(input_dict)
        parameter = model.get_parameter(full_layer_name)
        rows = (parameter.to_local() if isinstance(parameter, DTensor) else parameter).shape[0]
        if config.pool_multiple > 1 and tensor.shape[0] < rows:
            tensor = torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])
        return {full_layer_name: tensor}

    @property
    def reverse_op(self) -> ConversionOps:
        return DropPoolPadding()


class DropPoolPadding(ConversionOps):
    """On save: a pool tensor cut to the entries the config's maps address."""

    def convert(self, input_dict, source_patterns, target_patterns, *, full_layer_name, config, **kwargs):
        tensor = only_tensor(input_dict)
        layer_idx = int(LAYER_INDEX.search(full_layer_name).group(1))
        return {full_layer_name: tensor[: config.pool_sizes[layer_idx]]}

    @property
    def reverse_op(self) -> ConversionOps:
        return PadPoolEntries()


def pool_padding_converter() -> WeightConverter:
    """The converter of every pool tensor, `layers.<i>.experts.<name>` exactly: not a tenant's
    `...mlp.shared_experts.down_proj.weight` (DeepSeek-V3). The whole name is the capture group,
    so the reverse pattern, which transformers derives from it for saving, is as narrow."""
    return WeightConverter(r"(layers\.\d+\.experts\.\w+)(?!\.)", r"\1", operations=[PadPoolEntries()])


__all__ = ["DropPoolPadding", "PadPoolEntries", "pool_padding_converter"]
