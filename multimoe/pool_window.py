"""A pool call on the CPU that skips the pool entries no row routes to.

torch's CPU `grouped_mm`, transformers' default experts implementation, visits every group it is
given, empty or not: a zero-row product and its bookkeeping per entry. One tenant's rows reach at
most its E experts, yet a pool of 32 entries cost 32 visits per projection, a fixed cost per layer
that made one tenant decode slower the more entries the pool held (docs/benchmarks.md, "Model
overhead"). Here a CPU call gets only the range of entries its rows route to, as views of the pool's
tensors (no copy): the kernel sees the same non-empty groups in the same order (a window may start
at another alignment, which some CPUs' kernels sum in another order: see multimoe.alignment). A
CUDA call runs the pool whole, the fused kernel as it is.
"""

from __future__ import annotations

import torch
from torch import nn


class PoolWindow:
    """Entries `start .. start + num_experts` of a pool, as an experts implementation reads a pool:
    the pool's own attributes, each expert tensor narrowed on dim 0 and `num_experts` the window's."""

    def __init__(self, pool: nn.Module, start: int, num_experts: int):
        self.pool, self.start, self.num_experts = pool, start, num_experts

    def __getattr__(self, name: str):
        value = getattr(self.pool, name)
        if name in self.pool._parameters:  # every tensor of a fused experts class is stacked over experts
            return value.narrow(0, self.start, self.num_experts)
        return value


def call_pool(pool: nn.Module, hidden_states: torch.Tensor, routing: torch.Tensor, weights: torch.Tensor):
    """`pool(hidden_states, routing, weights)`, on the window of entries `routing` reaches where that
    spares the kernel empty groups: a CPU call of a fused experts class (transformers' experts
    implementations add `_apply_gate` to it; Switch's per-expert container takes a dispatch mask
    instead) through `grouped_mm`, not expert parallel, outside a compiled or traced graph (the
    window's bounds are read on the host), on a pool without buffers or hooks (a direct call of the
    class's forward would skip them)."""
    if (
        routing.device.type != "cpu"
        or not hasattr(type(pool), "_apply_gate")
        or getattr(pool, "_is_expert_parallel", False)
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or getattr(getattr(pool, "config", None), "_experts_implementation", None) != "grouped_mm"
        or pool._buffers  # a window narrows parameters only
        or has_hooks(pool)
    ):
        return pool(hidden_states, routing, weights)
    start, stop = int(routing.min()), int(routing.max()) + 1
    if stop - start == pool.num_experts:
        return pool(hidden_states, routing, weights)
    return type(pool).forward(PoolWindow(pool, start, stop - start), hidden_states, routing - start, weights)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run anything besides its class's forward: its own hooks, the
    global module hooks, or a replaced `forward` (accelerate's offloading)."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    hooks = nn.modules.module
    global_hooks = (hooks._global_forward_hooks, hooks._global_forward_pre_hooks, hooks._global_backward_hooks,
                    hooks._global_backward_pre_hooks)
    return any(own) or any(global_hooks) or "forward" in vars(module)


__all__ = ["PoolWindow", "call_pool"]
