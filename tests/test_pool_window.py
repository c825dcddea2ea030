"""A CPU pool call runs grouped_mm over the window of entries its rows route to: the same
outputs and gradients as the whole pool, and the whole pool wherever the window cannot apply."""

from __future__ import annotations

import pytest
import torch

import multimoe.modeling
import multimoe.pool_window
from multimoe import MultiTenantMixtralForCausalLM
from multimoe.pool_window import call_pool, has_hooks

TOLERANCE = dict(rtol=0, atol=1e-5)  # a window may start at another alignment; see multimoe/alignment.py


@pytest.fixture
def windows(monkeypatch):
    """The size of each window a pool call ran on (None: the whole pool)."""
    sizes = []
    original = multimoe.pool_window.PoolWindow

    class Counting(original):
        def __init__(self, pool, start, num_experts):
            super().__init__(pool, start, num_experts)
            sizes.append((start, num_experts))

    monkeypatch.setattr(multimoe.pool_window, "PoolWindow", Counting)
    return sizes


def whole_pool(monkeypatch):
    monkeypatch.setattr(multimoe.modeling, "call_pool", lambda pool, *args: pool(*args))


def test_a_window_gives_the_whole_pools_output(multi):
    pool = multi.model.layers[0].experts
    hidden = torch.randn(6, multi.config.hidden_size, generator=torch.Generator().manual_seed(0))
    routing = torch.tensor([[2, 3], [3, 4], [2, 4], [4, 2], [3, 2], [2, 3]])
    weights = torch.softmax(torch.randn(6, 2, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(call_pool(pool, hidden, routing, weights), pool(hidden, routing, weights), **TOLERANCE)


def test_a_tenant_whose_entries_are_part_of_the_pool_runs_on_their_range(multi, tenants, batch, windows, monkeypatch):
    with torch.no_grad():
        actual = multi(**batch, tenant="base").logits
        expected = tenants["base"](**batch).logits
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert windows and all(count < size for (start, count), size in zip(windows, multi.config.pool_sizes))
    whole_pool(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(multi(**batch, tenant="base").logits, actual, **TOLERANCE)


def test_gradients_reach_the_pool_through_a_window(tenants, batch, windows, monkeypatch):
    def pool_gradients():
        model = MultiTenantMixtralForCausalLM.from_models(tenants).train()
        model(**batch, tenant="base", labels=batch["input_ids"]).loss.backward()
        return [layer.experts.gate_up_proj.grad for layer in model.model.layers]

    windowed = pool_gradients()
    assert windows
    whole_pool(monkeypatch)
    for actual, expected in zip(windowed, pool_gradients()):
        torch.testing.assert_close(actual, expected, **TOLERANCE)


def test_the_whole_pool_runs_where_a_window_cannot(multi, batch, windows):
    pool = multi.model.layers[0].experts
    multi.set_experts_implementation("eager")  # loops over the entries routed to by itself
    try:
        with torch.no_grad():
            multi(**batch, tenant="base")
    finally:
        multi.set_experts_implementation("grouped_mm")
    handle = pool.register_forward_hook(lambda module, args, output: None)  # a hook must run
    try:
        with torch.no_grad():
            multi(**batch, tenant="base")
    finally:
        handle.remove()
    assert len(windows) == len(multi.model.layers) - 1  # only the unhooked layer


def test_any_hook_a_direct_call_would_skip_keeps_the_pool_whole(multi):
    pool = multi.model.layers[0].experts
    assert not has_hooks(pool)
    for register in (pool.register_forward_pre_hook, pool.register_full_backward_hook,
                     torch.nn.modules.module.register_module_forward_hook):
        handle = register(lambda *args: None)
        try:
            assert has_hooks(pool)
        finally:
            handle.remove()
