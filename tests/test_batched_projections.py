"""Mixed batches run each projection's tenant groups as one batched product over the tenants'
weights laid side by side in memory: the same rows as each tenant's own run, no weight copied, and
one product per group wherever the layout or the module says otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import multimoe.batched_projections
import multimoe.modeling
import multimoe
from multimoe import MultiTenantMixtralForCausalLM
from multimoe.modeling import MultiTenantDecoderLayer
from multimoe.testing import fine_tune, random_model, tiny_config
from multimoe.batched_projections import (
    MAX_PADDING,
    NotBatched,
    WeightProducts,
    batchable,
    batched_linear,
    lay_side_by_side,
    side_by_side,
)

PROMPTS = ["hello there", "hi", "what is 2+2?", "code: x=1", "ok"]
ROW_TENANTS = ["code", "code", "chat", "base", "base"]  # not in the model's order: base, chat, code, tied
TOLERANCE = dict(rtol=0, atol=1e-5)  # bmm and per-group mm may sum in other orders


def projections(model, path: str = "self_attn.q_proj", layer: int = 0) -> list[nn.Linear]:
    return [own.get_submodule(path) for own in model.model.layers[layer].tenants.values()]


def laid_out(model) -> bool:
    """Whether every grouped projection of every layer holds its tenants' weights side by side."""
    return all(
        side_by_side([linear.weight for linear in projections(model, path, index)]) is not None
        for index, layer in enumerate(model.model.layers)
        for path in layer.grouped_paths
    )


@pytest.fixture
def fresh(tenants):
    return MultiTenantMixtralForCausalLM.from_models(tenants).eval()


@pytest.fixture
def products(monkeypatch):
    """The number of tenant groups of each batched product (`bmm`) the calls run."""
    calls = []
    original = multimoe.batched_projections.run_product

    def counting(batched, weights, biases):
        calls.append(len(weights))
        return original(batched, weights, biases)

    monkeypatch.setattr(multimoe.batched_projections, "run_product", counting)
    return calls


def mixed_logits(model, tokenizer, rows=ROW_TENANTS):
    inputs = tokenizer(PROMPTS[: len(rows)], return_tensors="pt", padding=True)
    with torch.no_grad():
        return inputs, model(**inputs, tenant_names=rows).logits


def test_every_grouped_projection_is_laid_out_after_building_and_loading(fresh, tmp_path):
    layer = fresh.model.layers[0]
    assert layer.grouped_paths == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate"  # the router too
    ]
    assert laid_out(fresh)
    fresh.save_pretrained(tmp_path)
    loaded = MultiTenantMixtralForCausalLM.from_pretrained(tmp_path)
    assert laid_out(loaded)
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "switch_transformers"])
def test_a_built_model_takes_the_assembled_layout_without_a_copy(family):
    """The assembly stores each layer parameter of all tenants side by side, so that building the
    model (at scale, from tens of GB of tenant layers) copies nothing: every grouped projection's
    weight is the assembled tensor itself."""
    from multimoe.assembly import TenantSet, assemble_lossless

    base = random_model(tiny_config(family), seed=0)
    tenants = TenantSet.open({"a": base, "b": fine_tune(base, seed=1, changed_experts=[0]), "c": base})
    config, state_dict = assemble_lossless(tenants)
    pointers = {key: tensor.data_ptr() for key, tensor in state_dict.items()}
    model = multimoe.modeling.classes_for(tenants.family)[2].from_assembly(tenants, config, state_dict)
    layers = [(name, layer) for name, layer in model.named_modules() if isinstance(layer, MultiTenantDecoderLayer)]
    grouped = [[f"{name}.tenants.{tenant}.{path}.weight" for tenant in layer.tenants]
               for name, layer in layers for path in layer.grouped_paths]
    assert len(grouped) >= len(layers) > 0
    for keys in grouped:
        assert side_by_side([model.get_parameter(key) for key in keys]) is not None, keys
        for key in keys:
            assert model.get_parameter(key).data_ptr() == pointers[key], key


def test_mixed_rows_equal_each_tenants_own_run_through_one_product_per_projection(fresh, tenants, tokenizer, products):
    inputs, actual = mixed_logits(fresh, tokenizer)
    assert products == [3] * 5 * len(fresh.model.layers)  # q/k/v/o and the router: the 3 groups in one bmm each
    for row, name in enumerate(ROW_TENANTS):
        with torch.no_grad():
            expected = tenants[name](**inputs).logits[row]
        mask = inputs["attention_mask"][row].bool()
        torch.testing.assert_close(actual[row][mask], expected[mask], **TOLERANCE)


def test_a_weight_moved_out_of_the_layout_runs_per_group_with_the_same_rows(fresh, tokenizer):
    _, before = mixed_logits(fresh, tokenizer)
    moved = projections(fresh)[1]  # chat's q_proj: now a tensor of its own
    moved.weight.data = moved.weight.data.clone()
    assert side_by_side([linear.weight for linear in projections(fresh)]) is None
    _, after = mixed_logits(fresh, tokenizer)
    torch.testing.assert_close(after, before, **TOLERANCE)
    fresh.model.layers[0].lay_out_projections()
    assert laid_out(fresh)


def test_hooks_and_wrappers_are_honoured(fresh, tokenizer, products):
    """A hook on one tenant's projection (as PEFT, accelerate or a user places) must run: that
    projection runs per group; the others stay batched."""
    _, before = mixed_logits(fresh, tokenizer)
    seen = []
    projections(fresh)[0].register_forward_hook(lambda module, args, output: seen.append(output.shape[0]))
    products.clear()
    _, after = mixed_logits(fresh, tokenizer)
    assert seen == [2]  # base's two rows, through its own module
    assert products == [3] * (5 * len(fresh.model.layers) - 1)  # the hooked path runs per group, the others batched
    torch.testing.assert_close(after, before, **TOLERANCE)


def test_to_keeps_the_layout_and_the_values(fresh):
    weights = {key: tensor.clone() for key, tensor in fresh.state_dict().items()}
    fresh.to(torch.float64)
    assert laid_out(fresh)
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, weights[key].to(torch.float64)), key


@pytest.mark.parametrize("removed", ["base", "code", "tied"])  # first, middle, last in storage
def test_tenant_edits_lay_out_again_and_free_a_removed_tenants_slice(fresh, tenants, tokenizer, removed):
    fresh.remove_tenant(removed)
    assert laid_out(fresh)
    weights = [linear.weight for linear in projections(fresh)]
    assert weights[0].untyped_storage().nbytes() == sum(weight.nbytes for weight in weights)  # 3 slices, not 4
    if removed != "code":
        return
    fresh.add_tenant("code", tenants["code"])
    assert laid_out(fresh)
    inputs, actual = mixed_logits(fresh, tokenizer, ["code", "base", "base", "chat", "code"])
    with torch.no_grad():
        expected = tenants["code"](**inputs).logits[0]
    mask = inputs["attention_mask"][0].bool()
    torch.testing.assert_close(actual[0][mask], expected[mask], **TOLERANCE)


def test_training_gives_each_tenant_its_own_gradient(fresh, tokenizer):
    fresh.train()
    inputs = tokenizer(PROMPTS[:3], return_tensors="pt", padding=True)
    fresh(**inputs, tenant_names=["chat", "base", "chat"], labels=inputs["input_ids"]).loss.backward()
    gradients = {name: linear.weight.grad for name, linear in zip(fresh.tenants, projections(fresh))}
    assert gradients["code"] is None and gradients["tied"] is None
    assert gradients["chat"].abs().sum() > 0 and gradients["base"].abs().sum() > 0


@pytest.mark.parametrize(
    "sizes, order",
    [
        ([2, 2, 2], [0, 1, 2]),  # even groups: one product, no padding
        ([3, 1, 2], [0, 1, 2]),  # uneven: zero-padded to 3 rows each
        ([2, 2], [0, 2]),  # a tenant absent between: two runs
        ([1, 2, 1], [2, 0, 1]),  # groups out of storage order: one run, in storage order
        ([2, 2], [2, 0]),  # out of order, a tenant absent between: runs of one
        ([9, 1, 1], [0, 1, 2]),  # padding beyond MAX_PADDING: one product per group
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_batched_linear_equals_one_product_per_group(sizes, order, bias):
    generator = torch.Generator().manual_seed(0)
    linears = [nn.Linear(16, 8, bias=bias) for _ in range(3)]
    for linear in linears:
        for parameter in linear.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator)
    for name in ("weight", "bias") if bias else ("weight",):
        lay_side_by_side([getattr(linear, name) for linear in linears])
    groups = [linears[index] for index in order]
    inputs = torch.randn(sum(sizes), 16, generator=generator)
    expected = torch.cat([F.linear(part, linear.weight, linear.bias) for part, linear in zip(inputs.split(sizes), groups)])
    actual = batched_linear(inputs, sizes, [linear.weight for linear in groups], [linear.bias for linear in groups])
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert MAX_PADDING < 9 * 3 / 11 - 1  # the last case is beyond the padding bound


def test_side_by_side_needs_one_storage_in_order():
    stacked = torch.randn(3, 4, 5)
    rows = [stacked[0], stacked[1], stacked[2]]
    assert torch.equal(side_by_side(rows), stacked)
    assert side_by_side([rows[1], rows[0]]) is None
    assert side_by_side([rows[0], rows[2]]) is None
    assert side_by_side([rows[0], rows[1].clone()]) is None
    assert side_by_side([torch.randn(4, 5, device="meta")] * 2) is None


class Router(nn.Module):
    """A top-k router as the families write one: its product, then a softmax and a top-k per row."""

    def __init__(self, cast: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16, generator=torch.Generator().manual_seed(2)))
        self.cast = cast

    def forward(self, hidden):
        logits = F.linear(hidden, self.weight.float() if self.cast else self.weight)
        return torch.topk(logits.softmax(-1), 2, dim=-1)


def test_a_routers_product_runs_per_group_with_the_rest_of_its_code_once():
    routers = [Router() for _ in range(3)]
    for index, router in enumerate(routers):
        router.weight.data = router.weight.data + index
    lay_side_by_side([router.weight for router in routers])
    sizes, inputs = [2, 3, 1], torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    weights = [router.weight for router in routers]

    def product(rows):
        return batched_linear(rows, sizes, weights, [None] * 3)

    with torch.no_grad(), WeightProducts(routers[0].weight, None, product, rows=6):
        values, indices = routers[0](inputs)
    for part, router, value, index in zip(inputs.split(sizes), routers, values.split(sizes), indices.split(sizes)):
        expected_values, expected_indices = router(part)
        torch.testing.assert_close(value, expected_values.detach(), **TOLERANCE)
        assert torch.equal(index, expected_indices)


def test_a_module_using_its_weight_otherwise_is_not_batched():
    router = Router(cast=True)
    with pytest.raises(NotBatched), torch.no_grad(), WeightProducts(router.weight, None, lambda rows: rows, rows=2):
        router(torch.randn(2, 16))
    with pytest.raises(NotBatched), torch.no_grad(), WeightProducts(router.weight, None, lambda rows: rows, rows=2):
        router.weight.sum()  # no product at all
    with pytest.raises(NotBatched), torch.no_grad(), WeightProducts(router.weight, None, lambda rows: rows, rows=3):
        Router.forward(router, torch.randn(2, 16))  # a product over other rows than the module was given


def test_only_modules_holding_one_weight_and_no_state_are_batched():
    routers = [Router() for _ in range(2)]
    with torch.no_grad():
        assert batchable(routers) is not None
        routers[1].register_buffer("offset", torch.ones(4))  # state the product would not carry per tenant
        assert batchable(routers) is None
    linears = [nn.Linear(4, 4) for _ in range(2)]
    for linear in linears:
        linear.weight.requires_grad_(False)  # a bias still trained (BitFit) needs its own gradient
    assert batchable(linears) is None
    with torch.no_grad():
        assert batchable(linears) is not None
        handle = linears[1].register_full_backward_hook(lambda *args: None)  # a batched product would skip it
        assert batchable(linears) is None
        handle.remove()


def test_trained_biases_get_their_own_gradients_in_a_mixed_batch(monkeypatch):
    base = random_model(tiny_config("qwen2_moe"), seed=0)
    model = multimoe.from_models({"a": base, "b": fine_tune(base, seed=1, changed_experts=[0])}).train()
    inputs = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14]])

    def bias_gradients():
        model.zero_grad()
        model.requires_grad_(False)
        for linear in projections(model):
            linear.bias.requires_grad_(True)
        model(input_ids=inputs, tenant_names=["b", "a", "a"], labels=inputs).loss.backward()
        return [linear.bias.grad for linear in projections(model)]

    batched = bias_gradients()
    monkeypatch.setattr(multimoe.modeling, "batchable", lambda modules: None)
    for actual, expected in zip(batched, bias_gradients()):
        assert actual is not None and actual.abs().sum() > 0
        torch.testing.assert_close(actual, expected, **TOLERANCE)


def test_a_router_using_its_weight_otherwise_runs_per_group_with_the_same_rows(fresh, tokenizer, monkeypatch):
    from transformers.models.mixtral import modeling_mixtral

    _, before = mixed_logits(fresh, tokenizer)
    original = modeling_mixtral.MixtralTopKRouter.forward

    def casting(self, hidden_states):  # reads its weight through a cast: no longer only a product
        with torch.no_grad():
            self.weight.float()
        return original(self, hidden_states)

    monkeypatch.setattr(modeling_mixtral.MixtralTopKRouter, "forward", casting)
    _, after = mixed_logits(fresh, tokenizer)
    torch.testing.assert_close(after, before, **TOLERANCE)
    gates = [layer.mixed.get_submodule("mlp.gate") for layer in fresh.model.layers]
    assert [gate.batches for gate in gates] == [False] * len(gates)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_mixed_generation_through_batched_products_equals_each_row_alone(fresh, tenants, tokenizer, products, num_beams):
    settings = dict(max_new_tokens=8, min_new_tokens=8, num_beams=num_beams, do_sample=False, pad_token_id=0)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    output = fresh.generate(**inputs, tenant_names=ROW_TENANTS, **settings)[:, inputs["input_ids"].shape[1] :]
    assert products  # the mixed steps ran batched
    for row, (prompt, name) in enumerate(zip(PROMPTS, ROW_TENANTS)):
        alone = tokenizer(prompt, return_tensors="pt")
        expected = tenants[name].generate(**alone, **settings)[:, alone["input_ids"].shape[1] :]
        assert torch.equal(output[row : row + 1], expected), (row, name)
