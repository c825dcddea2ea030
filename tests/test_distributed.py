"""A multi-tenant model on transformers' own distributed path: `from_pretrained(...,
distributed_config=DistributedConfig(tp_plan="auto"))` under torchrun, 2 CPU processes with gloo,
gives every tenant's logits, a mixed batch's and its greedy generation as one process does, and
saves a checkpoint that loads on one process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multimoe
from multimoe.testing import fine_tune, random_model, tiny_config

WORKER = Path(__file__).with_name("distributed_worker.py")
TOLERANCE = 1e-5  # the split products sum in another order (an all-reduce over the ranks' halves)
ROWS = ["a", "b", "c"]


def build_checkpoint(directory: Path, family: str) -> dict:
    base = random_model(tiny_config(family), seed=0)
    tenants = {"a": base, "b": fine_tune(base, seed=1, changed_experts=[0, 1]), "c": fine_tune(base, seed=2, changed_experts=[2])}
    model = multimoe.from_models(tenants).eval()
    model.save_pretrained(directory)
    inputs = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12], [3, 3, 5, 5, 7, 7]])
    with torch.no_grad():
        reference = {name: model(inputs, tenant=name).logits for name in model.tenants}
        reference["mixed"] = model(inputs, tenant_names=ROWS).logits
    reference |= {"input_ids": inputs, "row_tenants": ROWS}
    reference["generated"] = model.generate(inputs, tenant_names=ROWS, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.save(reference, directory / "reference.pt")
    return reference | {"state_dict": model.state_dict(), "model": model}


def run_two_ranks(*arguments: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_tensor_parallel_over_two_processes_matches_one(family, tmp_path):
    reference = build_checkpoint(tmp_path / "checkpoint", family)
    report, saved = tmp_path / "report.json", tmp_path / "saved"
    run_two_ranks(str(tmp_path / "checkpoint"), str(report), str(saved))
    result = json.loads(report.read_text())
    assert result["world_size"] == 2
    # Split as the family's plan splits its own model: the parameters its rules name, for every
    # tenant and the pool, each rank holding half (gpt-oss's plan splits only its embeddings).
    model = reference["model"]
    planned = {name for name, _ in model.named_parameters() if plan_style(model, name) in SPLIT_STYLES}
    assert set(result["split"]) == planned and planned
    for name, local in result["split"].items():
        whole = list(model.get_parameter(name).shape)
        assert sorted(local) != sorted(whole) and sum(a != b for a, b in zip(local, whole)) == 1, (name, local, whole)
    for name, difference in result["differences"].items():
        assert difference < TOLERANCE, name
    assert result["generated"] == reference["generated"].tolist()
    # One rank wrote one complete checkpoint, swapped in whole: no staging directory is left.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint", "report.json", "saved"]
    loaded = type(model).from_pretrained(saved)
    for key, tensor in reference["state_dict"].items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


SPLIT_STYLES = {"colwise", "rowwise", "packed_colwise", "colwise_gather_output", "rowwise_split_input", "embedding_rowwise"}


def plan_style(model, name: str) -> str | None:
    """The style the model's tensor-parallel plan gives parameter `name` (rules name modules, or the parameter)."""
    generic = re.sub(r"\.\d+(\.|$)", lambda match: ".*" + match.group(1), name)
    return model.tp_plan.get(generic, model.tp_plan.get(generic.rpartition(".")[0]))
