"""Tenants' projections side by side in memory, so that a mixed batch runs them as one product.

In a mixed-tenant batch every tenant group's rows go through that tenant's own projections (q/k/v/o,
DeepSeek's latent projections, ...). One `nn.Linear` call per group costs a launch per group, and on
the CPU a product of a few rows runs far below the speed of one larger product
(`benchmarks/batched_projections.py`). The segmented GEMM of Punica and S-LoRA is the answer for
adapters; for full weights it needs the groups' weights as one [groups, out, in] tensor.

That tensor is not a copy here. The tenants' weights (and biases) of one projection of a layer are
kept as consecutive slices of one storage, in tenant order, and each tenant's `nn.Linear` still
holds its own `Parameter`, a view of its slice, because PEFT, tensor-parallel plans, the family's
code and per-tenant training address the module by name. A mixed batch reads the slices of the
tenants it holds as one strided view and runs one `bmm` for them: no memory beyond the weights
themselves, and nothing to invalidate, since the layout is read off the parameters on every call
rather than remembered. An edit that writes in place (an optimizer step, `load_state_dict`, a LoRA
merge) keeps the layout; one that replaces a tensor (`.to()` by parameter, a deep copy, a LoRA
wrapper, a tensor-parallel split) simply ends it for that projection, and the groups run one
product each until the layer is laid out again (`MultiTenantDecoderLayer.lay_out_projections`, run
after loading, `.to()` and every tenant edit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# Zero-padding groups to a common row count costs compute on the padding rows: at most as many
# padding rows as real ones (decode is bound by reading the weights, prefill by computing).
MAX_PADDING = 1.0


def lay_side_by_side(tensors: Sequence[torch.Tensor]) -> None:
    """Move `tensors` (parameters of one shape, dtype and device) into consecutive slices of one
    new storage, each keeping its identity; a no-op where they already are, or cannot be (meta)."""
    if not plain(tensors[0]) or side_by_side(tensors) is not None:
        return
    with torch.no_grad():
        stacked = torch.stack([tensor.detach() for tensor in tensors])
    for tensor, row in zip(tensors, stacked):
        tensor.data = row


def side_by_side(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """`tensors` as one [len, ...] view, without a copy, when they lie one after another in one
    storage; else `None`."""
    if not plain(tensors[0]) or not tensors[0].is_contiguous() or not all(map(follows, tensors, tensors[1:])):
        return None
    return stacked_view(tensors)


def plain(tensor: torch.Tensor) -> bool:
    """A tensor with storage of its own kind (not a tensor subclass such as a DTensor, not meta)."""
    return type(tensor) in (torch.Tensor, nn.Parameter) and not tensor.is_meta


def follows(previous: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether `tensor` starts where `previous` ends, in the same storage, with its shape and dtype
    (and both are plain and contiguous)."""
    return (
        plain(tensor)
        and type(tensor) is type(previous)
        and previous.is_contiguous()
        and tensor.shape == previous.shape
        and tensor.dtype == previous.dtype
        and tensor.is_contiguous()
        and tensor.untyped_storage().data_ptr() == previous.untyped_storage().data_ptr()
        and tensor.storage_offset() == previous.storage_offset() + previous.numel()
    )


def runs_side_by_side(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> list[tuple[int, int]]:
    """The maximal runs `[start, end)` of groups whose weights (and biases) lie side by side."""
    runs, start = [], 0
    for end in range(1, len(weights) + 1):
        if end == len(weights) or not (
            follows(weights[end - 1], weights[end])
            and (biases[end] is None if biases[end - 1] is None else follows(biases[end - 1], biases[end]))
        ):
            runs.append((start, end))
            start = end
    return runs


def batchable(modules: Sequence[nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]] | None:
    """The weights and biases of `modules` (one class, holding a `weight` and maybe a `bias` and
    nothing else) when their products may run batched: no hooks (torch's, or accelerate's, which
    replace `forward` to bring offloaded weights in), and no gradient wanted (a product over a view
    of several tenants' weights would not reach each tenant's parameter); else `None`."""
    kind = type(modules[0])
    if not all(
        type(module) is kind
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in vars(module)
        and WEIGHT_AND_BIAS.issuperset(module._parameters)
        for module in modules
    ):
        return None
    weights = [module._parameters.get("weight") for module in modules]
    biases = [module._parameters.get("bias") for module in modules]
    if any(weight is None for weight in weights):
        return None
    if torch.is_grad_enabled() and any(weight.requires_grad for weight in weights):
        return None
    return weights, biases


WEIGHT_AND_BIAS = frozenset(("weight", "bias"))


def is_weight_product(module: nn.Module) -> bool:
    """Whether `module` holds one matrix `weight` (and maybe a `bias`) and nothing else, as an
    `nn.Linear` or a top-k router does: what a mixed batch may run as one batched product."""
    weight = module._parameters.get("weight")
    return (
        weight is not None
        and weight.dim() == 2
        and WEIGHT_AND_BIAS.issuperset(module._parameters)
        and not module._buffers
        and not any(True for _ in module.children())
    )


class NotBatched(Exception):
    """A module used its weight other than through its product: it runs per tenant group instead."""


class WeightProducts(TorchFunctionMode):
    """While one tenant's module runs on every group's rows (in tenant order), its product
    `F.linear(x, weight, bias)` is each group's product with its own tenant's weight (`product(x)`);
    any other use of the module's tensors raises `NotBatched`, before it computes anything with them."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, product):
        super().__init__()
        self.own = tuple(tensor for tensor in (weight, bias) if tensor is not None)
        self.weight, self.bias, self.product = weight, bias, product

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            bound = dict(zip(("input", "weight", "bias"), args)) | kwargs
            if bound.get("weight") is self.weight and bound.get("bias") is self.bias:
                return self.product(bound["input"])
        if uses(self.own, (args, kwargs)):
            raise NotBatched(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def uses(tensors: tuple[torch.Tensor, ...], value) -> bool:
    """Whether `value` (arguments, nested in tuples, lists and dicts) holds one of `tensors` itself."""
    if isinstance(value, (tuple, list)):
        return any(uses(tensors, item) for item in value)
    if isinstance(value, dict):
        return any(uses(tensors, item) for item in value.values())
    return any(value is tensor for tensor in tensors)


def batched_linear(
    inputs: torch.Tensor, sizes: Sequence[int], weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """Group `g`'s `sizes[g]` rows of `inputs` ([rows, in], groups one after another) through
    `F.linear(rows, weights[g], biases[g])`: one `bmm` per run of groups whose weights lie side by
    side (zero-padded to the run's largest group within `MAX_PADDING`), one product per group elsewhere."""
    outputs, offset = [], 0
    for start, end in runs_side_by_side(weights, biases):
        run_sizes, rows = sizes[start:end], sum(sizes[start:end])
        group_inputs = inputs[offset : offset + rows]
        offset += rows
        widest = max(run_sizes)
        if end - start == 1 or widest * len(run_sizes) > (1 + MAX_PADDING) * rows:
            outputs.extend(
                F.linear(part, weight, bias)
                for part, weight, bias in zip(group_inputs.split(run_sizes), weights[start:end], biases[start:end])
            )
        else:
            outputs.append(run_product(group_inputs, run_sizes, weights[start:end], biases[start:end], widest))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def run_product(
    inputs: torch.Tensor,
    sizes: Sequence[int],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    widest: int,
) -> torch.Tensor:
    """One run's groups as one batched product, [sum(sizes), out]."""
    stacked = stacked_view(weights).transpose(1, 2)
    even = all(size == widest for size in sizes)
    if even:
        batched = inputs.view(len(sizes), widest, inputs.shape[-1])
    else:
        batched = inputs.new_zeros(len(sizes), widest, inputs.shape[-1])
        for index, part in enumerate(inputs.split(sizes)):
            batched[index, : part.shape[0]] = part
    if biases[0] is None:
        products = torch.bmm(batched, stacked)
    else:
        products = torch.baddbmm(stacked_view(biases).unsqueeze(1), batched, stacked)
    if even:
        return products.view(-1, products.shape[-1])
    return torch.cat([products[index, :size] for index, size in enumerate(sizes)])


def stacked_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors known to lie side by side as one [len, ...] view."""
    first = tensors[0]
    return first.as_strided((len(tensors), *first.shape), (first.numel(), *first.stride()))


__all__ = [
    "NotBatched",
    "WeightProducts",
    "batchable",
    "batched_linear",
    "is_weight_product",
    "lay_side_by_side",
    "side_by_side",
]
