"""Session fixtures: a base, two fine-tunes and a tied-embedding tenant, and their multi-tenant model;
and the device the marked subset (`-m device`, run by scripts/gpu_check.sh) runs on."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import MixtralForCausalLM, PreTrainedTokenizerFast

from multimoe import MultiTenantMixtralForCausalLM
from multimoe.testing import character_tokenizer, fine_tune, random_mixtral, tiny_mixtral_config


def build_tenants() -> dict[str, MixtralForCausalLM]:
    """`chat` and `code` fine-tune `base` (experts {0, 1} and {1, 3} move); `tied` is unrelated but
    for its first two experts, which it shares with `base`, and it ties lm_head to its embedding."""
    base = random_mixtral(tiny_mixtral_config(), seed=0)
    tied = random_mixtral(tiny_mixtral_config(tie_word_embeddings=True), seed=1)
    with torch.no_grad():
        for layer, base_layer in zip(tied.model.layers, base.model.layers):
            layer.mlp.experts.gate_up_proj[:2] = base_layer.mlp.experts.gate_up_proj[:2]
            layer.mlp.experts.down_proj[:2] = base_layer.mlp.experts.down_proj[:2]
    return {
        "base": base,
        "chat": fine_tune(base, seed=1, changed_experts={0, 1}),
        "code": fine_tune(base, seed=2, changed_experts={1, 3}),
        "tied": tied,
    }


@pytest.fixture(scope="session")
def tenants() -> dict[str, MixtralForCausalLM]:
    return build_tenants()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return character_tokenizer()


@pytest.fixture(scope="session")
def multi(tenants) -> MultiTenantMixtralForCausalLM:
    return MultiTenantMixtralForCausalLM.from_models(tenants).eval()


@pytest.fixture
def batch(tokenizer):
    """Two left-padded rows of different lengths."""
    return tokenizer(["hello there", "hi"], return_tensors="pt", padding=True)


# The device of the tests marked `device`: `MULTIMOE_TEST_DEVICE=cuda` runs them on a GPU (see
# scripts/gpu_check.sh); every other test runs on the CPU.
DEVICE_VARIABLE = "MULTIMOE_TEST_DEVICE"


@pytest.fixture(scope="session")
def device() -> torch.device:
    device = torch.device(os.environ.get(DEVICE_VARIABLE, "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"{DEVICE_VARIABLE}={device} but torch sees no CUDA device.")
    return device
