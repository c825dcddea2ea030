"""A multi-tenant model on transformers' own distributed path: `from_pretrained(...,
distributed_config=DistributedConfig(tp_plan="auto"))` under torchrun, 2 CPU processes with gloo,
gives every tenant's logits, a mixed batch's and its greedy generation as one process does, and
saves a checkpoint that loads on one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multimoe import MultiTenantMixtralForCausalLM
from multimoe.testing import fine_tune, random_mixtral, tiny_mixtral_config

WORKER = Path(__file__).with_name("distributed_worker.py")
TOLERANCE = 1e-5  # the split products sum in another order (an all-reduce over the ranks' halves)
ROWS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    base = random_mixtral(tiny_mixtral_config(), seed=0)
    tenants = {"a": base, "b": fine_tune(base, seed=1, changed_experts=[0, 1]), "c": fine_tune(base, seed=2, changed_experts=[2])}
    model = MultiTenantMixtralForCausalLM.from_models(tenants).eval()
    directory = tmp_path_factory.mktemp("four-tenants")
    model.save_pretrained(directory)
    inputs = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12], [3, 3, 5, 5, 7, 7]])
    with torch.no_grad():
        reference = {name: model(inputs, tenant=name).logits for name in model.tenants}
        reference["mixed"] = model(inputs, tenant_names=ROWS).logits
    reference |= {"input_ids": inputs, "row_tenants": ROWS, "state_dict": model.state_dict()}
    reference["generated"] = model.generate(inputs, tenant_names=ROWS, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.save(reference, directory / "reference.pt")
    return directory, reference


def run_two_ranks(*arguments: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def test_tensor_parallel_over_two_processes_matches_one(checkpoint, tmp_path):
    directory, reference = checkpoint
    report, saved = tmp_path / "report.json", tmp_path / "saved"
    run_two_ranks(str(directory), str(report), str(saved))
    result = json.loads(report.read_text())
    assert result["world_size"] == 2
    # Really split: each rank holds half of every tenant's q_proj rows and half of each pool entry's
    # gate/up rows (the whole shapes are [32, 32] and [7, 96, 32]).
    assert result["split"] == {"attention": ["DTensor", [16, 32]], "pool": ["DTensor", [7, 48, 32]]}
    for name, difference in result["differences"].items():
        assert difference < TOLERANCE, name
    assert result["generated"] == reference["generated"].tolist()
    # One rank wrote one complete checkpoint, swapped in whole: no staging directory is left.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.json", "saved"]
    loaded = MultiTenantMixtralForCausalLM.from_pretrained(saved)
    for key, tensor in reference["state_dict"].items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
