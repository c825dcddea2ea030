"""Switching tenants: by name, copying nothing, refusing unknown names without side effects."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from multimoe import CheckpointError, MultiTenantMixtralConfig, MultiTenantMixtralForCausalLM, UnknownTenantError


def test_tenants_and_active_model(multi):
    assert multi.tenants == ["base", "chat", "code", "tied"]
    multi.set_active_model("code")
    assert multi.active_model == "code"
    assert multi.get_input_embeddings() is multi.model.embed_tokens["code"]
    assert multi.get_output_embeddings() is multi.lm_head["code"]


def test_unknown_tenant_raises_listing_known_ones_and_keeps_the_active_one(multi, batch):
    multi.set_active_model("chat")
    with pytest.raises(UnknownTenantError, match=r"'nope'.*\['base', 'chat', 'code', 'tied'\]"):
        multi.set_active_model("nope")
    assert multi.active_model == "chat"
    with pytest.raises(UnknownTenantError, match="'nope'"):
        multi(**batch, tenant="nope")
    assert multi.active_model == "chat"


def test_switching_copies_and_reregisters_nothing(multi):
    def snapshot():
        tensors = dict(multi.named_parameters(remove_duplicate=False)) | dict(multi.named_buffers())
        return {name: (tensor.data_ptr(), tensor._version) for name, tensor in tensors.items()}

    before = snapshot()
    for name in ["chat", "code", "tied", "base"] * 3:
        multi.set_active_model(name)
    assert snapshot() == before


def test_config_rejects_maps_that_do_not_fit_the_pool():
    fields = dict(num_hidden_layers=1, num_local_experts=2, pool_sizes=[2], default_tenant="a")
    good = {"a": {"expert_map": [[0, 1]]}}
    assert MultiTenantMixtralConfig(tenants=good, **fields).tenant_names == ["a"]
    with pytest.raises(ValueError, match=r"'a', layer 0: pool index 2 is outside the pool of 2"):
        MultiTenantMixtralConfig(tenants={"a": {"expert_map": [[0, 2]]}}, **fields)
    with pytest.raises(ValueError, match="must list 2 pool indices"):
        MultiTenantMixtralConfig(tenants={"a": {"expert_map": [[0]]}}, **fields)
    with pytest.raises(ValueError, match="one row per layer"):
        MultiTenantMixtralConfig(tenants={"a": {"expert_map": [[0, 1], [0, 1]]}}, **fields)
    with pytest.raises(ValueError, match="default_tenant 'b'"):
        MultiTenantMixtralConfig(tenants=good, **(fields | {"default_tenant": "b"}))
    with pytest.raises(ValueError, match="pool_sizes"):
        MultiTenantMixtralConfig(tenants=good, **(fields | {"pool_sizes": [2, 2]}))


def test_mixtral_keywords_pass_through_the_config():
    config = MultiTenantMixtralConfig(hidden_size=24, num_attention_heads=3, rope_parameters={"rope_theta": 500.0})
    assert config.hidden_size == 24 and config.num_attention_heads == 3
    assert config.rope_parameters["rope_theta"] == 500.0
    assert config.tenants == {} and config.model_type == "multitenant_mixtral"


def test_checkpoint_missing_a_tenants_weights_is_refused(multi, tmp_path):
    multi.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".code." not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing keys \[.*\.code\."):
        MultiTenantMixtralForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_with_tensors_for_an_unknown_tenant_is_refused(multi, tmp_path):
    multi.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tenants"] = [entry for entry in config["tenants"] if entry["name"] != "code"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected keys \[.*\.code\."):
        MultiTenantMixtralForCausalLM.from_pretrained(tmp_path)
