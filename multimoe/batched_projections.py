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
rather than remembered. An edit that writes in place (an optimizer step, `load_state_dict`, PEFT's
in-place LoRA merge) keeps the layout; one that replaces a tensor (`.to()` by parameter, a deep
copy, a LoRA wrapper, a tensor-parallel split) simply ends it for that projection, and the groups
run one product each until the layer is laid out again (`MultiTenantDecoderLayer.lay_out_projections`,
run after loading, `.to()` and every tenant edit). A router's product, inside the family's own
router code, is taken the same way through `WeightProducts`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .pool_window import has_hooks

# Zero-padding groups to a common row count costs compute on the padding rows: at most as many
# padding rows as real ones (decode is bound by reading the weights, prefill by computing).
MAX_PADDING = 1.0


def lay_side_by_side(tensors: Sequence[torch.Tensor | None]) -> None:
    """Move `tensors`, parameters of one shape, dtype and device, into consecutive slices of one new
    storage, each keeping its identity; a no-op where they already fill one storage that way, or
    cannot be moved (a missing bias, meta, a tensor subclass, tensors that differ)."""
    first = tensors[0]
    if not all(type(tensor) is nn.Parameter and plain(tensor) for tensor in tensors) or len(
        {(tensor.shape, tensor.dtype, tensor.device) for tensor in tensors}
    ) > 1:
        return
    if side_by_side(tensors) is not None and first.storage_offset() == 0 and (
        first.untyped_storage().nbytes() == sum(tensor.nbytes for tensor in tensors)
    ):
        return  # laid out, in a storage of their own: nothing else (a removed tenant's slice) kept alive
    with torch.inference_mode(False), torch.no_grad():  # parameters, not inference tensors, whatever the caller's mode
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
        and tensor.device == previous.device
        and tensor.is_contiguous()
        and tensor.untyped_storage().data_ptr() == previous.untyped_storage().data_ptr()
        and tensor.storage_offset() == previous.storage_offset() + previous.numel()
    )


def runs_side_by_side(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> list[list[int]]:
    """The groups (indices into `weights`) in runs whose weights (and biases) lie side by side, each
    run in storage order: a batch's groups come in the order its rows name tenants, which need not
    be the order the tenants' weights are laid out in."""
    def place(index: int) -> tuple[int, int]:
        weight = weights[index]
        return (weight.untyped_storage().data_ptr(), weight.storage_offset()) if plain(weight) else (0, 0)

    runs: list[list[int]] = []
    for index in sorted(range(len(weights)), key=place):
        previous = runs[-1][-1] if runs else None
        if previous is not None and follows(weights[previous], weights[index]) and (
            biases[index] is None if biases[previous] is None else follows(biases[previous], biases[index])
        ):
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def batchable(modules: Sequence[nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]] | None:
    """The weights and biases of `modules` (one class, each holding a `weight` and maybe a `bias`
    and nothing else, checked on every call) when their products may run batched: no hooks (the
    batched product calls no tenant's module, so it would skip them: see `has_hooks`), and no
    gradient wanted for a weight or bias (a product over a view of several tenants' tensors would
    not reach each tenant's parameter); else `None`."""
    kind = type(modules[0])
    if not all(type(module) is kind and is_weight_product(module) and not has_hooks(module) for module in modules):
        return None
    weights = [module._parameters["weight"] for module in modules]
    biases = [module._parameters.get("bias") for module in modules]
    if torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in (*weights, *biases)):
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
    """While one tenant's module runs on every group's rows (`rows` of them, tenant order), its
    product `F.linear(x, weight, bias)` is each group's product with its own tenant's weight
    (`product(x)`). A second product, one over other rows, one never taken, or any other use of the
    module's tensors raises `NotBatched`, before anything is computed with them. (A plain tensor
    attribute the module reads would not be seen: the families' routers hold none.)"""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, product, rows: int):
        super().__init__()
        self.own = tuple(tensor for tensor in (weight, bias) if tensor is not None)
        self.weight, self.bias, self.product, self.rows = weight, bias, product, rows
        self.taken = False

    def __exit__(self, *exception):
        super().__exit__(*exception)
        if exception[0] is None and not self.taken:
            raise NotBatched("the module returned without taking its product")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            bound = dict(zip(("input", "weight", "bias"), args)) | kwargs
            if bound.get("weight") is self.weight and bound.get("bias") is self.bias:
                inputs = bound["input"]
                if self.taken or inputs.numel() != self.rows * inputs.shape[-1]:
                    raise NotBatched("its product is not one product over the rows it was given")
                self.taken = True
                return self.product(inputs)
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
    runs = runs_side_by_side(weights, biases)
    if len(runs) == 1 and runs[0] == sorted(runs[0]) and len(set(sizes)) == 1 and len(sizes) > 1:
        # The common case (a serving batch of every tenant, rows in tenant order): no copy at all.
        batched = inputs.reshape(len(sizes), sizes[0], inputs.shape[-1])
        return run_product(batched, weights, biases).view(-1, weights[0].shape[0])
    parts, outputs = inputs.split(list(sizes)), [None] * len(sizes)
    for run in runs:
        run_sizes = [sizes[index] for index in run]
        widest = max(run_sizes)
        if len(run) == 1 or widest * len(run) > (1 + MAX_PADDING) * sum(run_sizes):
            for index in run:
                outputs[index] = F.linear(parts[index], weights[index], biases[index])
            continue
        batched = inputs.new_zeros(len(run), widest, inputs.shape[-1])
        for row, index in enumerate(run):
            batched[row, : sizes[index]] = parts[index]
        products = run_product(batched, [weights[index] for index in run], [biases[index] for index in run])
        for row, index in enumerate(run):
            outputs[index] = products[row, : sizes[index]]
    return torch.cat(outputs)


def run_product(batched: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]):
    """[groups, rows, in] through weights lying side by side: one batched product, [groups, rows, out]."""
    stacked = stacked_view(weights).transpose(1, 2)
    if biases[0] is None:
        return torch.bmm(batched, stacked)
    return torch.baddbmm(stacked_view(biases).unsqueeze(1), batched, stacked)


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
