"""Quantized tenant checkpoints: dequantized on load where transformers can (gpt-oss in MXFP4,
DeepSeek-V3 in FP8), refused naming the quantization otherwise."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import FineGrainedFP8Config, Mxfp4Config

import multimoe
from multimoe import CheckpointError
from multimoe.testing import random_model, tiny_config


def quantize_experts_to_mxfp4(directory) -> None:
    """Rewrite a saved gpt-oss checkpoint's experts in the MXFP4 layout of the released gpt-oss
    checkpoints (random 4-bit blocks and shared exponents), with its quantization_config."""
    weights, generator = load_file(directory / "model.safetensors"), torch.Generator().manual_seed(0)
    for key in [key for key in weights if key.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = weights.pop(key).shape
        shape = (experts, outputs, inputs // 32)
        weights[f"{key}_blocks"] = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=generator)
        weights[f"{key}_scales"] = torch.randint(120, 130, shape, dtype=torch.uint8, generator=generator)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                     "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (directory / "config.json").write_text(json.dumps(config))


def quantize_linears_to_fp8(directory) -> None:
    """Rewrite a saved DeepSeek-V3 checkpoint's projections (experts, attention, dense MLPs) in the
    block-wise FP8 layout of the released DeepSeek-V3 checkpoints (e4m3 weights, one inverse scale
    per 128x128 block), with its quantization_config."""
    weights = load_file(directory / "model.safetensors")
    for key in list(weights):
        tensor = weights[key]
        skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight")
        if tensor.dim() == 2 and key.endswith(".weight") and not any(part in key for part in skip):
            blocks = [-(-size // 128) for size in tensor.shape]
            weights[key] = tensor.to(torch.float8_e4m3fn)
            weights[key.replace(".weight", ".weight_scale_inv")] = torch.full(blocks, 0.5)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (directory / "config.json").write_text(json.dumps(config))


def test_an_fp8_checkpoint_is_dequantized_on_load_and_served_as_transformers_dequantizes_it(tmp_path):
    config = tiny_config("deepseek_v3", hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                         q_lora_rank=128, kv_lora_rank=128, num_attention_heads=2, num_key_value_heads=2)
    random_model(config).save_pretrained(tmp_path)
    quantize_linears_to_fp8(tmp_path)
    reference = multimoe.FAMILIES["deepseek_v3"].causal_lm_class.from_pretrained(
        tmp_path, quantization_config=FineGrainedFP8Config(dequantize=True)
    ).eval()
    assert not reference.is_quantized
    model = multimoe.from_models({"quantized": tmp_path, "dequantized": reference}).eval()
    assert model.config.pool_sizes == [0, 8, 8]  # a dense layer, then the same dequantized experts once
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids, tenant="quantized").logits, reference(ids).logits, atol=1e-5)


@pytest.fixture(scope="module")
def mxfp4_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    random_model(tiny_config("gpt_oss", hidden_size=64, intermediate_size=32, head_dim=16)).save_pretrained(directory)
    quantize_experts_to_mxfp4(directory)
    return directory


def test_an_mxfp4_checkpoint_is_dequantized_on_load_and_served_as_transformers_dequantizes_it(mxfp4_directory):
    reference = multimoe.FAMILIES["gpt_oss"].causal_lm_class.from_pretrained(
        mxfp4_directory, quantization_config=Mxfp4Config(dequantize=True)
    ).eval()
    model = multimoe.from_models({"quantized": mxfp4_directory, "dequantized": reference}).eval()
    assert type(model).__name__ == "MultiTenantGptOssForCausalLM"
    assert model.config.pool_sizes == [4, 4]  # the same dequantized experts, stored once
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids, tenant="quantized").logits, reference(ids).logits, atol=1e-5)


def test_a_loaded_model_still_quantized_is_refused(mxfp4_directory, monkeypatch):
    source = multimoe.FAMILIES["gpt_oss"].causal_lm_class.from_pretrained(
        mxfp4_directory, quantization_config=Mxfp4Config(dequantize=True)
    )
    monkeypatch.setattr(source, "is_quantized", True, raising=False)
    source.config.quantization_config = FineGrainedFP8Config()
    with pytest.raises(CheckpointError, match=r"Tenant 'a': its weights are quantized \(fp8\).*dequantize"):
        multimoe.from_models({"a": source})


def test_a_quantization_transformers_cannot_dequantize_is_refused_naming_it(mxfp4_directory, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((mxfp4_directory / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"Tenant 'a': its weights are quantized \(bitsandbytes\)"):
        multimoe.from_models({"a": tmp_path})
