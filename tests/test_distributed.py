"""A multi-tenant model on transformers' own distributed path: `from_pretrained(...,
distributed_config=DistributedConfig(tp_plan="auto"))` under torchrun, 2 CPU processes with gloo,
gives every tenant's logits, a mixed batch's and its greedy generation as one process does, and
saves a checkpoint that loads on one process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multimoe
from multimoe.testing import fine_tune, random_model, tiny_config

WORKER = Path(__file__).with_name("distributed_worker.py")
TOLERANCE = 1e-5  # the split products sum in another order (an all-reduce over the ranks' halves)


def build_checkpoint(directory: Path, family: str, tenants: int = 3, sources: dict | None = None) -> dict:
    """`tenants` tenants of a tiny `family` model (3: pools of 7 entries; 2: of 6), or `sources`,
    saved with the one-process logits and generation."""
    if sources is None:
        base = random_model(tiny_config(family), seed=0)
        sources = {"a": base, "b": fine_tune(base, seed=1, changed_experts=[0, 1]), "c": fine_tune(base, seed=2, changed_experts=[2])}
        sources = dict(list(sources.items())[:tenants])
    model = multimoe.from_models(sources).eval()
    names = list(sources)
    rows = [names[1], names[2], names[0]] if len(names) == 3 else ["a", "b", "a"]
    model.save_pretrained(directory)
    inputs = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12], [3, 3, 5, 5, 7, 7]])
    with torch.no_grad():
        reference = {name: model(inputs, tenant=name).logits for name in model.tenants}
        reference["mixed"] = model(inputs, tenant_names=rows).logits
    reference |= {"input_ids": inputs, "row_tenants": rows}
    reference["generated"] = model.generate(inputs, tenant_names=rows, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.save(reference, directory / "reference.pt")
    return reference | {"state_dict": model.state_dict(), "model": model}


def run_two_ranks(*arguments: str) -> None:
    """The worker on 2 CPU processes (gloo, even on a machine with GPUs), killed whole after 180 s."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), *arguments]
    environment = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks
        process.communicate()
        raise
    assert process.returncode == 0, output[-4000:]


def split_run(split: str, family: str, tmp_path: Path, tenants: int = 3, sources: dict | None = None) -> tuple[dict, dict]:
    reference = build_checkpoint(tmp_path / "checkpoint", family, tenants, sources)
    report = tmp_path / "report.json"
    run_two_ranks(split, str(tmp_path / "checkpoint"), str(report), str(tmp_path / "saved"))
    return reference, json.loads(report.read_text())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_tensor_parallel_over_two_processes_matches_one(family, tmp_path):
    reference, result = split_run("tensor", family, tmp_path)
    # Split as the family's plan splits its own model: the parameters its rules name, for every
    # tenant and the pool, each rank holding half (gpt-oss's plan splits only its embeddings).
    model = reference["model"]
    planned = {name for name, _ in model.named_parameters() if plan_style(model.tp_plan, name) in SPLIT_STYLES}
    assert set(result["split"]) == planned and planned
    for name, local in result["split"].items():
        whole = list(model.get_parameter(name).shape)
        halved = [(size + 1) // 2 if size != part else size for size, part in zip(whole, local)]  # rank 0's half
        assert sum(a != b for a, b in zip(local, whole)) == 1 and local == halved, (name, local, whole)
    assert_same_as_one_process(reference, result, tmp_path)


def test_tensor_parallel_splits_a_tied_tenant_and_one_named_by_digits(tmp_path):
    """A tied tenant's head and embedding are split alike and saved once; a tenant named "7" (which
    transformers' rule matching reads as a layer number) is split like the others."""
    base = random_model(tiny_config("mixtral"), seed=0)
    tied = random_model(tiny_config("mixtral", tie_word_embeddings=True), seed=1)
    sources = {"a": base, "7": fine_tune(base, seed=1, changed_experts=[0, 1]), "tied": tied}
    reference, result = split_run("tensor", "mixtral", tmp_path, sources=sources)
    assert {"model.layers.0.tenants.7.self_attn.q_proj.weight", "lm_head.7.weight", "model.embed_tokens.7.weight",
            "model.embed_tokens.tied.weight"} <= set(result["split"])
    assert_same_as_one_process(reference, result, tmp_path)


@pytest.mark.parametrize("family, tenants", [("mixtral", 2), ("qwen3_moe", 2), ("mixtral", 3), ("gpt_oss", 3)])
def test_expert_parallel_over_two_processes_matches_one(family, tenants, tmp_path):
    """Each rank holds half of every pool's entries, whole. Pools of 7 entries (3 tenants) do not
    split over 2 ranks: each is padded with one zero entry no map points to, for this load only
    (memory_report shows it; the saved checkpoint holds the 7 entries)."""
    reference, result = split_run("expert", family, tmp_path, tenants=tenants)
    model = reference["model"]
    padded = [-(-size // 2) * 2 for size in model.config.pool_sizes]
    padding_bytes = 0
    for name, pool in model.named_parameters():
        if ".experts." in name:
            layer_idx = int(name.split(".layers.")[1].split(".")[0])
            assert result["split"][name] == [padded[layer_idx] // 2, *pool.shape[1:]], name
            padding_bytes += (padded[layer_idx] - pool.shape[0]) * pool[0].numel() * pool.element_size()
    assert result["padding_bytes"] == padding_bytes and (padding_bytes > 0) == (tenants == 3)
    assert result["pool_sizes"] == model.config.pool_sizes
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["pool_sizes"] == model.config.pool_sizes
    assert "pool_multiple" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    assert_same_as_one_process(reference, result, tmp_path)


TRAINING_INPUTS = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12], [3, 3, 5, 5, 7, 7], [9, 8, 7, 6, 5, 4]])


def fsdp_step(tmp_path: Path, rows: list[str]) -> tuple[dict, dict]:
    """One FSDP2 training step over 2 processes, rank r on rows 2r and 2r+1."""
    reference = build_checkpoint(tmp_path / "checkpoint", "mixtral", tenants=2)
    saved = {key: value for key, value in reference.items() if key not in ("model", "state_dict")}
    torch.save(saved | {"input_ids": TRAINING_INPUTS, "row_tenants": rows}, tmp_path / "checkpoint" / "reference.pt")
    report = tmp_path / "gradients.pt"
    run_two_ranks("fsdp", str(tmp_path / "checkpoint"), str(report), str(tmp_path / "unused"))
    return reference, torch.load(report)


def test_fsdp2_training_step_over_two_processes_gives_one_process_gradients(tmp_path):
    """transformers' FSDP2 path (`fsdp_size=2`) shards the model (the multi-tenant layers are its
    units; the tenants' embeddings, norms and heads stay in the root unit), and one data-parallel
    step on two halves of a mixed batch gives the gradients of one process on the whole batch (the
    mean of the halves' losses); the split model saves a checkpoint that loads on one process."""
    rows = ["a", "b", "a", "b"]
    reference, result = fsdp_step(tmp_path, rows)
    assert result["sharded"]
    # The save wrote the model's own remote code, not torch's FSDP files, and loads whole on one process.
    saved = tmp_path / "unused"
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling.{type(reference['model']).__name__}"
    assert "modeling.py" in {path.name for path in saved.iterdir()} and not list(saved.glob("_fsdp*.py"))
    loaded = type(reference["model"]).from_pretrained(saved)
    for key, tensor in reference["state_dict"].items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    inputs = TRAINING_INPUTS
    model = type(reference["model"]).from_pretrained(tmp_path / "checkpoint").train()
    halves = [model(input_ids=inputs[rows_], tenant_names=rows[rows_], labels=inputs[rows_]).loss
              for rows_ in (slice(0, 2), slice(2, 4))]
    (sum(halves) / 2).backward()
    expected = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert set(result["gradients"]) == set(expected)
    for name, gradient in expected.items():
        scale = gradient.abs().max().clamp_min(1e-12)
        assert (result["gradients"][name] - gradient).abs().max() / scale < TOLERANCE, name


@pytest.mark.parametrize("rows, named", [
    (["a", "b", "b", "b"], "[['a', 'b'], ['b']]"),  # rank 1 runs only b
    (["a", "b", "b", "a"], "[['a', 'b'], ['b', 'a']]"),  # the same tenants, in another order
])
def test_fsdp2_refuses_a_call_whose_ranks_run_other_tenants(tmp_path, rows, named):
    _, result = fsdp_step(tmp_path, rows)
    assert "every rank must run the same tenants, in the same order" in result["refused"]
    assert f"the ranks' rows name {named}" in result["refused"]


def assert_same_as_one_process(reference: dict, result: dict, tmp_path: Path) -> None:
    assert result["world_size"] == 2
    for name, difference in result["differences"].items():
        assert difference < TOLERANCE, name
    assert result["generated"] == reference["generated"].tolist()
    # One rank wrote one complete checkpoint, swapped in whole: no staging directory is left.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint", "report.json", "saved"]
    loaded = type(reference["model"]).from_pretrained(tmp_path / "saved")
    for key, tensor in reference["state_dict"].items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


SPLIT_STYLES = {"colwise", "rowwise", "packed_colwise", "colwise_gather_output", "rowwise_split_input", "embedding_rowwise"}


def plan_style(plan: dict[str, str], name: str) -> str | None:
    """The style a plan gives parameter `name` (its rules name modules, or the parameter)."""
    generic = re.sub(r"\.\d+(\.|$)", lambda match: ".*" + match.group(1), name)
    return plan.get(generic, plan.get(generic.rpartition(".")[0]))
