"""A family other than Mixtral (Qwen3-MoE, with a dense layer between its sparse ones) through the
tools around transformers: Hub repo ids, concurrent threads, accelerate's device_map with CPU and
disk offload, PEFT LoRA on one tenant, and `torch.compile(fullgraph=True)` with a static cache.

Logits of separately built models are compared within `TOLERANCE` (see test_families.py: the pool
runs the tenants' experts at other indices, which may change the kernels' summation order);
weights, and a saved model against itself reloaded, bit-exactly.
"""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from huggingface_hub import constants
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import multimoe
from multimoe import MultiTenantQwen3MoeForCausalLM
from multimoe.testing import character_tokenizer, fine_tune, load_offloaded, random_model, tiny_config

TOLERANCE = 1e-5
NAMES = ["zeta", "alpha"]
PROMPTS = ["hello there", "hi", "what is 2+2?"]
MIXED_ROWS = ["alpha", "zeta", "alpha"]
GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def originals():
    base = random_model(tiny_config("qwen3_moe"), seed=0)
    return {
        "zeta": fine_tune(base, seed=1, changed_experts=[0, 1]),
        "alpha": fine_tune(base, seed=2, changed_experts=[1, 3]),
    }


@pytest.fixture(scope="module")
def qwen(originals):
    model = multimoe.from_models(dict(originals)).eval()
    assert type(model) is MultiTenantQwen3MoeForCausalLM and model.config.pool_sizes == [7, 0, 7]
    return model


@pytest.fixture(scope="module")
def saved(qwen, tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3-multi")
    qwen.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def inputs():
    return character_tokenizer()(PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def expected_generations(originals, inputs):
    return {name: model.generate(**inputs, **GREEDY) for name, model in originals.items()}


def logits(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def assert_close(actual, expected, message=""):
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE, msg=lambda m: f"{message}\n{m}")


# -- Hub repo ids ------------------------------------------------------------------------------------------


def lay_out_hub_cache(cache, repo_id, files_from, revision="0123456789abcdef0123456789abcdef01234567", ref="main"):
    """The huggingface_hub cache layout: models--org--name/{refs/<ref>, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(files_from, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / ref).write_text(revision)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_repo_ids_in_both_layouts_build_the_same_model(originals, qwen, saved, inputs, offline_hub, tmp_path):
    originals["zeta"].save_pretrained(tmp_path / "zeta")  # legacy per-expert layout (the default save)
    originals["alpha"].save_pretrained(tmp_path / "alpha", save_original_format=False)  # fused
    lay_out_hub_cache(offline_hub, "acme/qwen3-zeta", tmp_path / "zeta")
    lay_out_hub_cache(offline_hub, "acme/qwen3-alpha", tmp_path / "alpha")
    model = multimoe.from_models({"zeta": "acme/qwen3-zeta", "alpha": "acme/qwen3-alpha"}).eval()
    assert type(model) is MultiTenantQwen3MoeForCausalLM and model.tenants == NAMES
    assert model.config.tenants["alpha"]["source"] == "acme/qwen3-alpha"
    assert model.config.pool_sizes == qwen.config.pool_sizes
    assert [spec["expert_map"] for spec in model.config.tenants.values()] == [
        spec["expert_map"] for spec in qwen.config.tenants.values()
    ]
    for key, value in qwen.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    mask = inputs["attention_mask"].bool()
    for name in NAMES:
        assert_close(logits(model, inputs, tenant=name)[mask], logits(originals[name], inputs)[mask], name)


def test_a_saved_model_loads_from_a_hub_id_and_revision(qwen, saved, inputs, offline_hub):
    lay_out_hub_cache(offline_hub, "acme/qwen3-multi", saved, revision="fedcba9876543210fedcba9876543210fedcba98",
                      ref="v1")
    for loader in (MultiTenantQwen3MoeForCausalLM, AutoModelForCausalLM, multimoe.MultiTenantForCausalLM):
        loaded = loader.from_pretrained("acme/qwen3-multi", revision="v1", cache_dir=offline_hub).eval()
        assert type(loaded) is MultiTenantQwen3MoeForCausalLM and loaded.tenants == NAMES
        assert loaded.generation_configs.keys() == qwen.generation_configs.keys()
        for name in NAMES:
            assert torch.equal(logits(loaded, inputs, tenant=name), logits(qwen, inputs, tenant=name)), name


# -- threads ------------------------------------------------------------------------------------------------


def test_concurrent_generation_for_different_tenants_never_mixes(qwen, inputs, expected_generations):
    stop = threading.Event()

    def churn() -> int:
        switches = 0
        while not stop.wait(0.0002):
            qwen.set_active_model(NAMES[switches % 2])
            switches += 1
        return switches

    def job(index: int):
        name = NAMES[index % 2]
        if index % 3 == 0:
            return name, qwen.generate(**inputs, **GREEDY, tenant=name)
        if index % 3 == 1:
            with qwen.active(name):
                return name, qwen.generate(**inputs, **GREEDY)
        return "mixed", qwen.generate(**inputs, **GREEDY, tenant_names=MIXED_ROWS)

    with ThreadPoolExecutor(max_workers=6) as pool:
        switcher = pool.submit(churn)
        try:
            results = list(pool.map(job, range(12)))
        finally:
            stop.set()
        assert switcher.result() > 0
    for name, output in results:
        if name == "mixed":
            for row, tenant in enumerate(MIXED_ROWS):
                assert torch.equal(output[row], expected_generations[tenant][row]), (row, tenant)
        else:
            assert torch.equal(output, expected_generations[name]), name


# -- accelerate device_map -----------------------------------------------------------------------------------


def test_device_map_with_cpu_and_disk_offload_keeps_layers_whole_and_outputs_unchanged(qwen, saved, inputs, tmp_path):
    half = qwen.memory_report().total_bytes // 2
    model = load_offloaded(MultiTenantQwen3MoeForCausalLM, saved, max_cpu_bytes=half, offload_folder=tmp_path / "offload")
    for name in NAMES:
        assert torch.equal(logits(model, inputs, tenant=name), logits(qwen, inputs, tenant=name)), name
    assert torch.equal(logits(model, inputs, tenant_names=MIXED_ROWS), logits(qwen, inputs, tenant_names=MIXED_ROWS))


# -- PEFT -------------------------------------------------------------------------------------------------------


def test_lora_on_one_tenants_attention_trains_it_alone(saved, inputs):
    model = MultiTenantQwen3MoeForCausalLM.from_pretrained(saved).eval()
    before = {name: logits(model, inputs, tenant=name) for name in NAMES}
    mixed_before = logits(model, inputs, tenant_names=MIXED_ROWS)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.tenants\.alpha\.self_attn\.(q_proj|v_proj)",
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 3  # A and B of q_proj and v_proj in each of the 3 layers
    assert all(".tenants.alpha.self_attn." in name and "lora_" in name for name in trainable)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model.train()
    first = peft_model(**inputs, labels=labels, tenant="alpha").loss
    first.backward()
    optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        assert peft_model(**inputs, labels=labels, tenant="alpha").loss < first
        assert torch.equal(peft_model(**inputs, tenant="zeta").logits, before["zeta"])
        assert not torch.allclose(peft_model(**inputs, tenant="alpha").logits, before["alpha"])
        mixed = peft_model(**inputs, tenant_names=MIXED_ROWS).logits
    # The zeta row: its weights are untouched, but the pool runs every row at once and alpha's rows now
    # route elsewhere, so grouped_mm may sum zeta's tokens in another order (a few ulps).
    assert torch.allclose(mixed[1], mixed_before[1], atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[0], mixed_before[0])
    output = peft_model.generate(**inputs, tenant="alpha", **GREEDY)
    assert output.shape == (3, inputs["input_ids"].shape[1] + GREEDY["max_new_tokens"])


# -- torch.compile ----------------------------------------------------------------------------------------------


def test_full_graph_compile_with_a_static_cache_generates_each_tenants_tokens(saved, inputs, expected_generations):
    assert MultiTenantQwen3MoeForCausalLM._can_compile_fullgraph
    model = MultiTenantQwen3MoeForCausalLM.from_pretrained(saved).eval()
    model.forward = torch.compile(model.forward, fullgraph=True)
    for name in ("alpha", "zeta"):
        output = model.generate(**inputs, tenant=name, cache_implementation="static", **GREEDY)
        assert torch.equal(output, expected_generations[name]), name
