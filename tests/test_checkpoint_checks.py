"""Checks against the config before anything is allocated or replaced (issue 11): a saved checkpoint
is compared with the tensors its config implies from the safetensors headers alone, a save is
verified before it replaces a checkpoint, and tenant sources keep no stray tensor out of sight."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel

import multimoe
from multimoe import CheckpointError, MultiTenantMixtralForCausalLM, MultiTenantMixtralModel
from multimoe.checkpoints import check_saved_directory
from multimoe.saving import atomic_save_pretrained
from multimoe.testing import random_mixtral, tiny_mixtral_config


def edit_config(directory: Path, **fields) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | fields))


def add_tensor(path: Path, key: str, tensor: torch.Tensor) -> None:
    save_file(load_file(path) | {key: tensor}, path, metadata={"format": "pt"})


def contents(directory: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in directory.rglob("*") if path.is_file()}


@pytest.fixture
def saved(multi, tmp_path):
    directory = tmp_path / "checkpoint"
    multi.save_pretrained(directory)
    return directory


# -- saved checkpoints against their config -------------------------------------------------------

# Loads each directory under an address-space cap of 1 GiB over what the imports take, and prints
# each refusal; an allocation of the sizes a hostile config claims fails under the cap instead.
# No GPU is visible to it: initialising CUDA alone reserves more address space than that.
CAPPED_LOAD = """
import os, resource, sys
from transformers import AutoModel

from multimoe import CheckpointError, MultiTenantMixtralForCausalLM, MultiTenantMixtralModel

with open("/proc/self/statm") as statm:
    address_space = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (address_space + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
for directory in sys.argv[1:]:
    try:
        MultiTenantMixtralForCausalLM.from_pretrained(directory)
    except CheckpointError as error:
        print("refused:", error)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="measures the address space through Linux's /proc")
def test_a_hostile_pool_size_is_refused_before_it_is_allocated(saved, tmp_path):
    sizes = [200_000, 10**7]  # 7 GB and 369 GB of float32 experts
    for size in sizes:
        shutil.copytree(saved, tmp_path / str(size))
        edit_config(tmp_path / str(size), pool_sizes=[size, size])  # every expert map stays valid
    result = subprocess.run(
        [sys.executable, "-c", CAPPED_LOAD, *(str(tmp_path / str(size)) for size in sizes)],
        env=os.environ | {"CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    refusals = [line for line in result.stdout.splitlines() if line.startswith("refused:")]
    assert len(refusals) == len(sizes)
    for size, refusal in zip(sizes, refusals):
        assert re.search(
            rf"tensor 'model\.layers\.0\.experts\.down_proj' has shape \[\d+, 32, 48\], the config implies "
            rf"\[{size}, 32, 48\]",
            refusal,
        )


def test_a_stray_lm_head_for_a_tied_tenant_is_refused(saved):
    # transformers would load it and untie the tenant's output head from its embedding.
    embedding = load_file(saved / "model.safetensors")["model.embed_tokens.tied.weight"]
    add_tensor(saved / "model.safetensors", "lm_head.tied.weight", torch.randn_like(embedding))
    with pytest.raises(CheckpointError, match=r"match its config: unexpected keys \['lm_head\.tied\.weight'\]"):
        MultiTenantMixtralForCausalLM.from_pretrained(saved)


def test_a_plain_mixtral_directory_points_to_from_models(tmp_path):
    directory = tmp_path / "mixtral"
    random_mixtral(tiny_mixtral_config()).save_pretrained(directory)
    with pytest.raises(
        CheckpointError,
        match=rf"{re.escape(str(directory))} holds a single 'mixtral' model, not a multi-tenant one "
        rf"\('multitenant_mixtral'\); build one from it with "
        rf"MultiTenantMixtralForCausalLM\.from_models\(\{{'name': '{re.escape(str(directory))}'\}}\)",
    ):
        MultiTenantMixtralForCausalLM.from_pretrained(directory)


def test_a_checkpoint_of_any_other_model_type_is_refused_by_name(saved):
    edit_config(saved, model_type="llama")
    with pytest.raises(CheckpointError, match=r"holds a single 'llama' model, not a multi-tenant one"):
        MultiTenantMixtralForCausalLM.from_pretrained(saved)


# -- saving ----------------------------------------------------------------------------------------


def save_verified(model, directory, **kwargs):
    """`atomic_save_pretrained` with the header check, as `save_pretrained` is to call it."""
    atomic_save_pretrained(
        super(multimoe.MultiTenantLM, model).save_pretrained,
        directory,
        verify=lambda staged: check_saved_directory(staged, type(model), variant=kwargs.get("variant")),
        **kwargs,
    )


def save_with_model(model, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)


SAVERS = pytest.mark.parametrize(
    "save", [save_verified, save_with_model], ids=["atomic_save_pretrained", "model.save_pretrained"]
)


@SAVERS
def test_a_save_that_would_not_load_leaves_the_previous_checkpoint_bit_exact(multi, saved, save):
    before = contents(saved)
    broken, vocab = copy.deepcopy(multi), multi.config.vocab_size
    broken.model.embed_tokens["chat"] = nn.Embedding(vocab + 8, multi.config.hidden_size)  # config says vocab
    with pytest.raises(
        CheckpointError,
        match=r"save_pretrained refused: the checkpoint it wrote would not load, so .*checkpoint is left as it was\. "
        rf".*tensor 'model\.embed_tokens\.chat\.weight' has shape \[{vocab + 8}, 32\], the config implies "
        rf"\[{vocab}, 32\]",
    ):
        save(broken, saved)
    assert contents(saved) == before
    assert [path.name for path in saved.parent.iterdir()] == ["checkpoint"]  # no staged save left over
    loaded = MultiTenantMixtralForCausalLM.from_pretrained(saved)
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in multi.state_dict().items())


@SAVERS
def test_saving_into_a_file_is_refused_before_anything_is_written(multi, tmp_path, save):
    (tmp_path / "a_file").write_text("notes")
    with pytest.raises(NotADirectoryError, match=r"save_pretrained: '.*a_file' is a file; give a directory"):
        save(multi, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "notes"
    assert [path.name for path in tmp_path.iterdir()] == ["a_file"]


# -- tenant sources --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral():
    return random_mixtral(tiny_mixtral_config())


@pytest.mark.parametrize(
    "layout, key",
    [
        ("legacy", "model.layers.0.block_sparse_moe.experts.9.w1.weight"),  # expert past num_local_experts
        ("legacy", "model.layers.0.block_sparse_moe.experts.0.w4.weight"),
        ("legacy", "model.layers.0.block_sparse_moe.experts.01.w1.weight"),  # aliases expert 1
        ("legacy", "model.layers.2.block_sparse_moe.experts.0.w1.weight"),  # layer past num_hidden_layers
        ("fused", "model.layers.0.mlp.experts.extra"),
    ],
)
def test_an_extra_tensor_in_a_source_directory_is_refused_by_name(mixtral, tmp_path, layout, key):
    mixtral.save_pretrained(tmp_path, save_original_format=layout == "legacy")
    add_tensor(tmp_path / "model.safetensors", key, torch.zeros(4, 32))
    with pytest.raises(CheckpointError, match=rf"Tenant 'extra': unexpected tensors .*\['{re.escape(key)}'\]"):
        MultiTenantMixtralForCausalLM.from_models({"base": mixtral, "extra": tmp_path})


def test_an_extra_parameter_in_a_loaded_source_is_refused_by_name(mixtral):
    source = copy.deepcopy(mixtral)
    source.model.layers[0].mlp.experts.register_parameter("extra", nn.Parameter(torch.zeros(4, 32)))
    with pytest.raises(
        CheckpointError, match=r"Tenant 'extra': unexpected tensors .*\['model\.layers\.0\.mlp\.experts\.extra'\]"
    ):
        MultiTenantMixtralForCausalLM.from_models({"base": mixtral, "extra": source})


# -- the base model and the Auto classes ------------------------------------------------------------


def test_the_base_model_loads_strictly_too(multi, saved, tmp_path):
    base = MultiTenantMixtralModel.from_pretrained(saved)
    for key, tensor in base.state_dict().items():
        assert torch.equal(tensor, multi.model.state_dict()[key]), key
    empty = tmp_path / "empty"
    shutil.copytree(saved, empty)
    save_file({"unrelated.weight": torch.zeros(2)}, empty / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing keys"):
        MultiTenantMixtralModel.from_pretrained(empty)


def test_auto_model_builds_the_base_model(multi):
    assert type(AutoModel.from_config(multi.config)) is MultiTenantMixtralModel


def test_the_generic_class_loads_each_family_as_its_own_class(tmp_path):
    from multimoe.testing import random_model, tiny_config

    multi = multimoe.from_models({"a": random_model(tiny_config("olmoe"))})
    multi.save_pretrained(tmp_path / "multi")
    loaded = multimoe.MultiTenantForCausalLM.from_pretrained(tmp_path / "multi")
    assert type(loaded).__name__ == "MultiTenantOlmoeForCausalLM" and loaded.tenants == ["a"]
    random_model(tiny_config("olmoe")).save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match=r"holds a 'olmoe' model, not a multi-tenant one \(build one with multimoe"):
        multimoe.MultiTenantForCausalLM.from_pretrained(tmp_path / "plain")
