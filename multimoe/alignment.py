"""Loaded weights in fresh, aligned storage, so that a loaded model computes as an in-memory one.

transformers hands out loaded tensors as views into the memory-mapped safetensors file, at offsets
the header length decides (8-byte aligned). On some CPUs (seen on an AVX-512 AMD EPYC) torch's
CPU `grouped_mm`, which runs the shared expert pool, then takes another code path and sums in
another order than for the same values in a freshly allocated tensor: a reloaded model's logits
differed from the saved model's by ~1e-6. A plain `MixtralForCausalLM` escapes this only because
its checkpoint conversion rebuilds the fused experts. Copying every unaligned weight once, at load
time, puts a loaded model on the layout an in-memory model has, whichever kernels a CPU picks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

# What torch's CPU allocator guarantees to every fresh tensor (c10's alignment).
ALIGNMENT = 64


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself if it already starts at an aligned address (or is not on the CPU), else a copy."""
    if tensor.device.type != "cpu" or tensor.data_ptr() % ALIGNMENT == 0:
        return tensor
    return tensor.clone()


class AlignedWeights(Mapping):
    """accelerate's offloaded-weights mapping, read through `aligned`: weights offloaded to disk are
    read from the checkpoint's own safetensors file on every forward, so they need it every time."""

    def __init__(self, weights: Mapping[str, torch.Tensor]):
        self.weights = weights

    def __getitem__(self, key: str) -> torch.Tensor:
        return aligned(self.weights[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


def realign(model: nn.Module) -> None:
    """Give every CPU parameter at an unaligned address aligned storage (tied parameters are one
    object, so they stay tied), and wrap the weights of modules offloaded by accelerate so that
    they arrive aligned at each forward."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = aligned(parameter.data)
    for module in model.modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)  # accelerate's PrefixedDataset
        if weights is not None and not isinstance(weights.dataset, AlignedWeights):
            weights.dataset = AlignedWeights(weights.dataset)


__all__ = ["AlignedWeights", "aligned", "realign"]
