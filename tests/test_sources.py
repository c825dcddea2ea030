"""from_models: every kind of source, and a clear error for every kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from multimoe import CheckpointError, IncompatibleTenantsError, MultiTenantMixtralForCausalLM, UnsupportedFamilyError
from multimoe.testing import tiny_mixtral_config


@pytest.fixture(scope="module")
def directories(tenants, tmp_path_factory):
    """`chat` in the legacy per-expert layout (v5's default save) and `code` in the fused layout."""
    root = tmp_path_factory.mktemp("sources")
    tenants["chat"].save_pretrained(root / "legacy")
    tenants["code"].save_pretrained(root / "fused", save_original_format=False)
    return root


def test_layouts_on_disk_are_the_two_we_claim(directories):
    from safetensors import safe_open

    with safe_open(str(directories / "legacy" / "model.safetensors"), "pt") as legacy:
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in legacy.keys()
    with safe_open(str(directories / "fused" / "model.safetensors"), "pt") as fused:
        assert "model.layers.0.mlp.experts.gate_up_proj" in fused.keys()


def logits_of(model, batch, tenant=None):
    with torch.no_grad():
        kwargs = {} if tenant is None else {"tenant": tenant}
        return model(**batch, **kwargs).logits


def test_directories_in_both_layouts_and_loaded_models_mix(tenants, directories, batch):
    model = MultiTenantMixtralForCausalLM.from_models(
        {"chat": directories / "legacy", "code": str(directories / "fused"), "base": tenants["base"]}
    ).eval()
    for name in ("chat", "code", "base"):
        torch.testing.assert_close(logits_of(model, batch, name), logits_of(tenants[name], batch), rtol=0, atol=1e-5)
    assert model.config.tenants["chat"]["source"] == str(directories / "legacy")


def lay_out_hub_cache(cache, repo_id, files_from, revision="0123456789abcdef0123456789abcdef01234567"):
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_hub_repo_ids_resolve_through_the_offline_cache(tenants, directories, batch, tmp_path, monkeypatch):
    lay_out_hub_cache(tmp_path, "acme/mixtral-chat", directories / "legacy")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = MultiTenantMixtralForCausalLM.from_models({"chat": "acme/mixtral-chat", "base": tenants["base"]})
    torch.testing.assert_close(logits_of(model, batch, "chat"), logits_of(tenants["chat"], batch), rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError, match=r"'missing'.*neither a local directory nor a Hub repo"):
        MultiTenantMixtralForCausalLM.from_models({"missing": "acme/not-cached", "base": tenants["base"]})


def test_identical_experts_are_stored_once(tenants):
    model = MultiTenantMixtralForCausalLM.from_models(tenants)
    # chat changed experts {0, 1}, code {1, 3}, tied shares experts 0-1 with base: per layer
    # base 4 + chat 2 + code 2 + tied 2 = 10 distinct experts.
    assert model.config.pool_sizes == [10, 10]
    maps = {name: spec["expert_map"][0] for name, spec in model.config.tenants.items()}
    assert maps["base"] == [0, 1, 2, 3]
    assert maps["chat"][2:] == [2, 3] and maps["code"][0] == 0 and maps["code"][2] == 2
    assert maps["tied"][:2] == [0, 1]


def test_identical_tenants_cost_one_model_of_experts(tenants):
    base = tenants["base"]
    model = MultiTenantMixtralForCausalLM.from_models({"a": base, "b": base, "c": base})
    assert model.config.pool_sizes == [4, 4]
    report = model.memory_report()
    one_model = sum(p.numel() * p.element_size() for p in base.parameters())
    experts = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if ".mlp.experts." in n)
    assert report.source_models_bytes == 3 * one_model
    assert report.pool_bytes == experts
    assert report.total_bytes == experts + 3 * (one_model - experts)
    assert set(report.tenant_bytes) == {"a", "b", "c"}
    assert "saving" in report.to_markdown()


def test_within_one_tenant_duplicate_experts_are_not_merged(tenants):
    twin = MixtralForCausalLM(tiny_mixtral_config()).eval()
    with torch.no_grad():
        twin.model.layers[0].mlp.experts.gate_up_proj[1] = twin.model.layers[0].mlp.experts.gate_up_proj[0]
        twin.model.layers[0].mlp.experts.down_proj[1] = twin.model.layers[0].mlp.experts.down_proj[0]
    model = MultiTenantMixtralForCausalLM.from_models({"twin": twin, "twin2": twin})
    assert model.config.tenants["twin"]["expert_map"][0] == [0, 1, 2, 3]
    assert model.config.tenants["twin2"]["expert_map"][0] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 64),
        ("num_hidden_layers", 3),
        ("num_local_experts", 8),
        ("num_experts_per_tok", 1),
        ("vocab_size", 50),
        ("num_attention_heads", 8),
        ("num_key_value_heads", 4),
        ("intermediate_size", 40),
        ("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}),
        ("sliding_window", 16),
    ],
)
def test_incompatible_tenants_name_the_first_mismatch(tenants, field, value, monkeypatch):
    other = MixtralForCausalLM(tiny_mixtral_config(**{field: value}))
    allocations = []
    monkeypatch.setattr(MultiTenantMixtralForCausalLM, "from_pretrained", lambda *a, **k: allocations.append(1))
    with pytest.raises(IncompatibleTenantsError, match=rf"'base' and 'other'.*{field}"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "other": other})
    assert not allocations


@pytest.mark.parametrize("name", ["", "a.b", "../up", "has space", "forward", 3])
def test_bad_tenant_names_are_rejected(tenants, name):
    with pytest.raises(ValueError, match="tenant name"):
        MultiTenantMixtralForCausalLM.from_models({name: tenants["base"]})


def test_empty_mapping_and_unknown_default_are_rejected(tenants):
    with pytest.raises(ValueError, match="at least one tenant"):
        MultiTenantMixtralForCausalLM.from_models({})
    with pytest.raises(ValueError, match="default_tenant 'nope'"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"]}, default_tenant="nope")


def test_non_mixtral_sources_are_rejected(tenants, tmp_path):
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=47, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(UnsupportedFamilyError, match="Tenant 'llama' is a 'llama' model, which is not a supported MoE"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "llama": llama})
    llama.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedFamilyError, match=r"Tenant 'llama' \(.*\) is a 'llama' model, which is not a supported"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "llama": tmp_path})
    with pytest.raises(CheckpointError, match="must be a model of a supported MoE family, a local directory or a Hub"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "x": 42})


def test_pickle_only_directory_is_refused(tenants, directories, tmp_path):
    shutil.copy(directories / "legacy" / "config.json", tmp_path / "config.json")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no safetensors weights.*pytorch_model.bin.*never loaded"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "old": tmp_path})


def test_wrong_shape_and_non_finite_tensors_are_named(tenants, directories, tmp_path):
    from safetensors.torch import load_file

    state = load_file(directories / "fused" / "model.safetensors")
    shutil.copy(directories / "fused" / "config.json", tmp_path / "config.json")

    broken = dict(state, **{"model.layers.1.self_attn.q_proj.weight": torch.zeros(3, 3)})
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'bad': model.layers.1.self_attn.q_proj.weight has shape \[3, 3\]"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "bad": tmp_path})

    poisoned = dict(state)
    poisoned["model.layers.0.mlp.experts.down_proj"] = state["model.layers.0.mlp.experts.down_proj"].clone()
    poisoned["model.layers.0.mlp.experts.down_proj"][2, 0, 0] = float("nan")
    save_file(poisoned, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'bad': model.layers.0.mlp.experts.down_proj contains NaN"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "bad": tmp_path})

    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'bad': tensor 'model.norm.weight' is missing"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "bad": tmp_path})


def test_corrupt_safetensors_file_is_reported(tenants, directories, tmp_path):
    shutil.copy(directories / "fused" / "config.json", tmp_path / "config.json")
    data = (directories / "fused" / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="'bad'"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "bad": tmp_path})


def test_shard_index_pointing_outside_the_directory_is_refused(tenants, directories, tmp_path):
    shutil.copy(directories / "fused" / "config.json", tmp_path / "config.json")
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lies outside"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "bad": tmp_path})
