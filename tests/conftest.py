"""Session fixtures: a base, two fine-tunes and a tied-embedding tenant, and their multi-tenant model."""

from __future__ import annotations

import pytest
from tiny import build_tenants, build_tokenizer
from transformers import MixtralForCausalLM, PreTrainedTokenizerFast

from multimoe import MultiTenantMixtralForCausalLM


@pytest.fixture(scope="session")
def tenants() -> dict[str, MixtralForCausalLM]:
    return build_tenants()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def multi(tenants) -> MultiTenantMixtralForCausalLM:
    return MultiTenantMixtralForCausalLM.from_models(tenants).eval()


@pytest.fixture
def batch(tokenizer):
    """Two left-padded rows of different lengths."""
    return tokenizer(["hello there", "hi"], return_tensors="pt", padding=True)
