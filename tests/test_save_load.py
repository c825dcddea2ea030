"""save_pretrained / from_pretrained: bit-exact, sharded, needs only the saved directory."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from multimoe import MultiTenantMixtralConfig, MultiTenantMixtralForCausalLM
from multimoe.alignment import ALIGNMENT


@pytest.fixture(scope="module")
def saved(multi, tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved")
    multi.save_pretrained(directory, max_shard_size="20KB")
    return directory


def test_saves_sharded_safetensors_without_pickle(saved):
    shards = sorted(path.name for path in saved.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert not list(saved.glob("*.bin"))


def test_checkpoint_layout_stores_the_pool_once_and_tenants_by_name(multi, saved):
    keys = set(json.loads((saved / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.0.experts.gate_up_proj" in keys
    assert "model.layers.1.tenants.chat.mlp.gate.weight" in keys
    assert "model.embed_tokens.tied.weight" in keys
    assert "lm_head.chat.weight" in keys
    assert "lm_head.tied.weight" not in keys  # tied to its embedding, stored once
    assert not any("expert_map" in key for key in keys)  # maps live in config.json
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "multitenant_mixtral"
    assert config["pool_sizes"] == multi.config.pool_sizes
    tenants = {entry.pop("name"): entry for entry in config["tenants"]}  # a list: JSON keys get sorted
    assert list(tenants) == multi.tenants and tenants["code"] == multi.config.tenants["code"]


def test_round_trip_is_bit_exact_through_auto_classes(multi, saved, batch):
    assert isinstance(AutoConfig.from_pretrained(saved), MultiTenantMixtralConfig)
    loaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert isinstance(loaded, MultiTenantMixtralForCausalLM)
    assert loaded.tenants == multi.tenants and loaded.active_model == multi.config.default_tenant
    original, restored = multi.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    for buffer, value in multi.named_buffers():
        assert torch.equal(value, loaded.get_buffer(buffer)), buffer
    assert loaded.lm_head["tied"].weight is loaded.model.embed_tokens["tied"].weight
    assert loaded.lm_head["chat"].weight is not loaded.model.embed_tokens["chat"].weight
    for name in multi.tenants:
        with torch.no_grad():
            assert torch.equal(loaded(**batch, tenant=name).logits, multi(**batch, tenant=name).logits)
        settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(loaded.generate(**batch, **settings, tenant=name), multi.generate(**batch, **settings, tenant=name))


def test_loaded_weights_lie_in_aligned_storage(saved):
    """Tensors straight from the file sit at 8-byte offsets, where some CPUs' grouped_mm sums in
    another order than for fresh storage (multimoe.alignment)."""
    loaded = MultiTenantMixtralForCausalLM.from_pretrained(saved)
    unaligned = [name for name, parameter in loaded.named_parameters() if parameter.data_ptr() % ALIGNMENT]
    assert not unaligned


def test_bfloat16_loading(multi, saved, tenants, tmp_path, batch):
    loaded = MultiTenantMixtralForCausalLM.from_pretrained(saved, dtype=torch.bfloat16).eval()
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.model.layers[0].tenants["chat"].mlp.experts.expert_map.dtype == torch.long
    tenants["chat"].save_pretrained(tmp_path / "chat")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "chat", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        actual = loaded(**batch, tenant="chat").logits
        expected = reference(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(actual[mask], expected[mask], rtol=0, atol=1e-2)


def test_from_models_in_bfloat16_keeps_dtype_through_save(tenants, tmp_path):
    model = MultiTenantMixtralForCausalLM.from_models(
        {"base": tenants["base"], "chat": tenants["chat"]}, dtype=torch.bfloat16
    )
    assert model.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    loaded = MultiTenantMixtralForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
