"""The tools around transformers: accelerate offload, low-memory loading, PEFT LoRA, torch.compile."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from multimoe import MultiTenantMixtralForCausalLM
from multimoe.memory import parameter_bytes
from multimoe.testing import fine_tune, load_offloaded, random_mixtral, tiny_mixtral_config


@pytest.fixture(scope="module")
def saved(multi, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ecosystem")
    multi.save_pretrained(directory)
    return directory


def test_device_map_with_disk_offload_keeps_layers_whole_and_outputs_unchanged(multi, saved, batch, tmp_path):
    half = multi.memory_report().total_bytes // 2
    model = load_offloaded(MultiTenantMixtralForCausalLM, saved, max_cpu_bytes=half, offload_folder=tmp_path / "offload")
    with torch.no_grad():
        for name in multi.tenants:
            assert torch.equal(model(**batch, tenant=name).logits, multi(**batch, tenant=name).logits), name


LOAD_AND_MEASURE = r"""
import sys, threading, time
import psutil
from multimoe import MultiTenantMixtralForCausalLM

process = psutil.Process()
before = process.memory_info().rss
peak, done = [before], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.002)

sampler = threading.Thread(target=sample)
sampler.start()
MultiTenantMixtralForCausalLM.from_pretrained(sys.argv[1], low_cpu_mem_usage=True)
done.set()
sampler.join()
print(peak[0] - before)
"""


def peak_load_growth(directory, loader: str) -> int:
    """Peak RSS growth of a fresh process while `loader(directory)` runs."""
    code = LOAD_AND_MEASURE.replace("MultiTenantMixtralForCausalLM.from_pretrained", loader)
    result = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


def test_low_cpu_mem_usage_loading_costs_no_more_per_byte_than_the_family_class(tmp_path):
    """Loading maps the file and copies the unaligned weights (see multimoe.alignment), as
    `MixtralForCausalLM` copies its converted experts: per byte of model, no more growth than the
    family's own class, and never a third copy."""
    config = tiny_mixtral_config(num_hidden_layers=4, hidden_size=256, intermediate_size=1024, num_local_experts=8,
                                 num_attention_heads=8, num_key_value_heads=4)
    base = random_mixtral(config)
    model = MultiTenantMixtralForCausalLM.from_models({"a": base, "b": fine_tune(base, seed=1, changed_experts=[0])})
    model.save_pretrained(tmp_path / "multi")
    base.save_pretrained(tmp_path / "plain")
    size, plain_size = model.memory_report().total_bytes, parameter_bytes([base])
    growth = peak_load_growth(tmp_path / "multi", "MultiTenantMixtralForCausalLM.from_pretrained")
    plain_growth = peak_load_growth(tmp_path / "plain", "__import__('transformers').MixtralForCausalLM.from_pretrained")
    assert growth / size < 1.1 * plain_growth / plain_size, (growth / size, plain_growth / plain_size)
    assert growth < 2.5 * size, f"loading {size / 2**20:.0f} MiB grew the process by {growth / 2**20:.0f} MiB"


def test_lora_on_one_tenants_attention_trains_and_generates(saved, batch):
    model = MultiTenantMixtralForCausalLM.from_pretrained(saved).eval()
    with torch.no_grad():
        before = {name: model(**batch, tenant=name).logits for name in model.tenants}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.tenants\.chat\.self_attn\.(q_proj|v_proj)",
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".tenants.chat.self_attn." in name and "lora_" in name for name in trainable)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model.train()
    first = peft_model(**batch, labels=labels, tenant="chat").loss
    first.backward()
    optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        assert peft_model(**batch, labels=labels, tenant="chat").loss < first
        for name, logits in before.items():
            unchanged = torch.equal(peft_model(**batch, tenant=name).logits, logits)
            assert unchanged == (name != "chat"), name
    output = peft_model.generate(**batch, tenant="chat", max_new_tokens=5, min_new_tokens=5, pad_token_id=0)
    assert output.shape == (2, batch["input_ids"].shape[1] + 5)


def test_full_graph_compile_with_a_static_cache_generates_the_same_tokens_as_eager(multi, saved, batch):
    """The fast path users compile: one tenant per call, a static cache, no graph break
    (`fullgraph=True` fails on any). The tenant is pinned by `generate`, and switching between
    calls recompiles nothing that changes the tokens."""
    assert MultiTenantMixtralForCausalLM._can_compile_fullgraph
    model = MultiTenantMixtralForCausalLM.from_pretrained(saved).eval()
    model.forward = torch.compile(model.forward, fullgraph=True)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    for name in ("chat", "tied"):
        assert torch.equal(model.generate(**batch, tenant=name, **settings),
                           multi.generate(**batch, tenant=name, **settings)), name
