"""add_tenant / remove_tenant: in place, the others bit-identical, and save/load afterwards."""

from __future__ import annotations

import pytest
import torch

from multimoe import IncompatibleTenantsError, MultiTenantMixtralForCausalLM
from multimoe.testing import fine_tune, random_mixtral, tiny_mixtral_config


@pytest.fixture
def model(tenants):
    return MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "chat": tenants["chat"]}).eval()


def all_logits(model, batch):
    with torch.no_grad():
        return {name: model(**batch, tenant=name).logits for name in model.tenants}


def test_add_tenant_shares_identical_experts_and_keeps_the_others_bit_identical(model, tenants, batch, tmp_path):
    before = all_logits(model, batch)
    model.add_tenant("code", tenants["code"])
    assert model.tenants == ["base", "chat", "code"]
    assert model.config.pool_sizes == [8, 8]  # code moved experts 1 and 3: two new entries per layer
    after = all_logits(model, batch)
    for name in before:
        assert torch.equal(after[name], before[name]), name
    with torch.no_grad():
        mask = batch["attention_mask"].bool()
        torch.testing.assert_close(after["code"][mask], tenants["code"](**batch).logits[mask], rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = MultiTenantMixtralForCausalLM.from_pretrained(tmp_path).eval()
    for name, logits in all_logits(reloaded, batch).items():
        assert torch.equal(logits, after[name]), name


def test_added_tied_tenant_generates_and_reports_router_logits(model, tenants, batch):
    with torch.no_grad():
        model(**batch, output_router_logits=True)  # transformers installs its capture hooks now
    model.add_tenant("tied", tenants["tied"])
    assert model.lm_head["tied"].weight is model.model.embed_tokens["tied"].weight
    with torch.no_grad():
        out = model(**batch, tenant="tied", output_router_logits=True)
        expected = tenants["tied"](**batch, output_router_logits=True)
    assert len(out.router_logits) == len(expected.router_logits)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**batch, tenant="tied", **settings), tenants["tied"].generate(**batch, **settings))


def test_add_tenant_with_a_threshold_shares_close_experts(model, tenants):
    close = fine_tune(tenants["base"], seed=9, changed_experts={0, 1, 2, 3}, scale=1e-4)
    model.add_tenant("close", close, threshold=1.0)
    assert model.config.pool_sizes == [6, 6]  # every expert joined an entry of base: nothing new
    assert model.config.tenants["close"]["expert_map"][0] == model.config.tenants["base"]["expert_map"][0]


def test_remove_tenant_drops_its_layers_and_unshared_entries(tenants, batch, tmp_path):
    model = MultiTenantMixtralForCausalLM.from_models(tenants).eval()
    model.set_active_model("code")
    before = all_logits(model, batch)
    model.remove_tenant("code")
    assert model.tenants == ["base", "chat", "tied"]
    assert model.config.pool_sizes == [8, 8]  # code's two own entries per layer are gone
    assert not any(".code." in key for key in model.state_dict())
    assert model.active_model == "base"
    after = all_logits(model, batch)
    for name in after:
        assert torch.equal(after[name], before[name]), name
    model.save_pretrained(tmp_path)
    reloaded = MultiTenantMixtralForCausalLM.from_pretrained(tmp_path).eval()
    for name, logits in all_logits(reloaded, batch).items():
        assert torch.equal(logits, after[name]), name


def test_bad_requests_change_nothing(model, tenants):
    snapshot = {key: value.clone() for key, value in model.state_dict().items()}
    config = model.config.to_dict()
    with pytest.raises(ValueError, match="already exists"):
        model.add_tenant("chat", tenants["code"])
    with pytest.raises(IncompatibleTenantsError, match="hidden_size"):
        model.add_tenant("wide", random_mixtral(tiny_mixtral_config(hidden_size=64)))
    with pytest.raises(ValueError, match="Invalid tenant name"):
        model.add_tenant("../x", tenants["code"])
    with pytest.raises(ValueError, match="needs calibration"):
        model.add_tenant("code", tenants["code"], similarity="output")
    model.remove_tenant("chat")
    with pytest.raises(ValueError, match="only tenant"):
        model.remove_tenant("base")
    with pytest.raises(ValueError, match="Unknown tenant 'chat'"):
        model.remove_tenant("chat")
    assert set(model.state_dict()) < set(snapshot)
    assert config["pool_sizes"] == [6, 6] and model.config.pool_sizes == [4, 4]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3", "switch_transformers"])
def test_removing_a_tenant_frees_its_share_of_every_layer_storage(family):
    """The assembly stores a layer's tensors of all tenants side by side: once a tenant is removed,
    the survivors' layer tensors hold storage of their own size, nothing of the removed tenant's,
    and compute as before."""
    from multimoe.modeling import MultiTenantDecoderLayer
    from multimoe.testing import random_model, tiny_config

    import multimoe

    base = random_model(tiny_config(family), seed=0)
    sources = {"a": base, "b": fine_tune(base, seed=1, changed_experts=[0]), "c": fine_tune(base, seed=2, changed_experts=[1])}
    model = multimoe.from_models(sources).eval()

    def own(name: str) -> bool:  # a survivor's tensor (the pool loses c's entries)
        return ".experts." not in name and ".c." not in name

    before = {name: tensor.clone() for name, tensor in model.state_dict().items() if own(name)}
    model.remove_tenant("c")
    layers = [layer for layer in model.modules() if isinstance(layer, MultiTenantDecoderLayer)]
    tensors = [tensor for layer in layers for tensor in (*layer.tenants.parameters(), *layer.tenants.buffers())]
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    assert sum(storages.values()) == sum(tensor.nbytes for tensor in tensors)
    after = {name: tensor for name, tensor in model.state_dict().items() if own(name)}
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]), name
