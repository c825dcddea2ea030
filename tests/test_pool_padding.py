"""Pools padded for expert parallelism (`pool_multiple`, set by `from_pretrained(..., distributed_config=
DistributedConfig(ep_size=N))`), on one process: the padding is zeros no tenant reads, shown by
`memory_report`, never saved, and a padded model refuses tenant edits. tests/test_distributed.py
runs the same split over two processes."""

from __future__ import annotations

import json

import pytest
import torch

import multimoe
from multimoe.testing import fine_tune, random_model, tiny_config

INPUTS = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]])


@pytest.fixture(scope="module", params=["mixtral", "gpt_oss"])
def saved(request, tmp_path_factory):
    """Three tenants (pools of 7 entries), saved; gpt-oss's experts carry biases."""
    base = random_model(tiny_config(request.param), seed=0)
    sources = {"a": base, "b": fine_tune(base, seed=1, changed_experts=[0, 1]), "c": fine_tune(base, seed=2, changed_experts=[2])}
    model = multimoe.from_models(sources).eval()
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return model, directory


def load_padded(model, directory, multiple: int):
    config = type(model.config).from_pretrained(directory)
    config.pool_multiple = multiple
    return type(model).from_pretrained(directory, config=config).eval()


def test_padding_is_zeros_no_tenant_reads_and_changes_no_output(saved):
    model, directory = saved
    padded = load_padded(model, directory, 4)
    assert model.config.pool_sizes == [7, 7]
    for layer, original in zip(padded.model.layers, model.model.layers):
        for name, tensor in original.experts.named_parameters():
            grown = layer.experts.get_parameter(name)
            assert grown.shape[0] == 8 and torch.equal(grown[:7], tensor) and not grown[7:].any(), name
        assert all(int(experts.expert_map.max()) < 7 for experts in layer.tenant_experts())
    with torch.no_grad():
        for name in model.tenants:
            assert torch.equal(padded(INPUTS, tenant=name).logits, model(INPUTS, tenant=name).logits), name
        rows = ["b", "c"]
        assert torch.allclose(padded(INPUTS, tenant_names=rows).logits, model(INPUTS, tenant_names=rows).logits, atol=1e-6)


def test_memory_report_shows_the_padding(saved):
    model, directory = saved
    padded = load_padded(model, directory, 4)
    report, unpadded = padded.memory_report(), model.memory_report()
    entry = sum(tensor[0].numel() * tensor.element_size() for tensor in model.model.layers[0].experts.parameters())
    assert report.padding_bytes == 2 * entry and unpadded.padding_bytes == 0  # one entry in each of 2 layers
    assert report.pool_bytes == unpadded.pool_bytes + report.padding_bytes
    assert report.source_models_bytes == unpadded.source_models_bytes
    assert "| of which padding for expert parallelism |" in report.to_markdown()
    assert "padding" not in unpadded.to_markdown()


def test_save_drops_the_padding(saved, tmp_path):
    model, directory = saved
    load_padded(model, directory, 4).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pool_sizes"] == [7, 7] and "pool_multiple" not in config
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.model.layers[0].experts.down_proj.shape[0] == 7
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


def test_a_pool_that_divides_is_not_padded(saved):
    model, directory = saved
    padded = load_padded(model, directory, 7)
    assert padded.model.layers[0].experts.down_proj.shape[0] == 7 and padded.memory_report().padding_bytes == 0


def test_a_padded_model_refuses_tenant_edits(saved):
    model, directory = saved
    padded = load_padded(model, directory, 4)
    with pytest.raises(ValueError, match="Cannot remove tenant 'c': the model is split over several ranks or padded"):
        padded.remove_tenant("c")
    with pytest.raises(ValueError, match="Cannot add tenant 'd': the model is split over several ranks or padded"):
        padded.add_tenant("d", directory)
    assert list(padded.tenants) == ["a", "b", "c"] and padded.model.layers[0].experts.down_proj.shape[0] == 8


@pytest.mark.parametrize("ep_size", [0, -2, 1.5, float("nan"), "2", True])
def test_a_bad_ep_size_is_refused_before_loading(saved, ep_size):
    model, directory = saved
    with pytest.raises((TypeError, ValueError), match="ep_size must be"):
        type(model).from_pretrained(directory, distributed_config={"ep_size": ep_size})
