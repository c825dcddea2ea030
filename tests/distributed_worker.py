"""One rank of tests/test_distributed.py, under `torchrun --standalone --nproc_per_node 2` (gloo on
the CPU): load a multi-tenant checkpoint split by transformers' `DistributedConfig` (tensor or
expert parallel), run every tenant and a mixed batch, generate, save, and report to a JSON file
(rank 0); or (FSDP2) take one training step on each rank's share of a mixed batch."""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import multimoe  # registers the multi-tenant classes with the Auto classes


SPLITS = {"tensor": {"tp_plan": "auto"}, "expert": {"tp_plan": "auto", "ep_size": 2}, "fsdp": {"fsdp_size": 2}}


def main(split: str, checkpoint: str, report: str, save_directory: str) -> None:
    reference = torch.load(f"{checkpoint}/reference.pt")
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, distributed_config=DistributedConfig(**SPLITS[split]))
    except ValueError as error:  # a refusal is the result (before the process group exists)
        if os.environ["RANK"] == "0":
            with open(report, "w") as file:
                json.dump({"refused": str(error)}, file)
        return
    assert isinstance(model, multimoe.MultiTenantForCausalLM), type(model)
    inputs, rows = reference["input_ids"], reference["row_tenants"]
    if split == "fsdp":
        return train_step(model, inputs, rows, report, save_directory)
    with torch.no_grad():
        differences = {
            name: (model(inputs, tenant=name).logits - reference[name]).abs().max().item() for name in model.tenants
        }
        differences["mixed"] = (model(inputs, tenant_names=rows).logits - reference["mixed"]).abs().max().item()
    generated = model.generate(inputs, tenant_names=rows, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.save_pretrained(save_directory)
    split = {name: list(value.to_local().shape) for name, value in model.named_parameters() if isinstance(value, DTensor)}
    if dist.get_rank() == 0:
        with open(report, "w") as file:
            json.dump({"differences": differences, "generated": generated.tolist(), "split": split,
                       "world_size": dist.get_world_size(), "padding_bytes": model.memory_report().padding_bytes,
                       "pool_sizes": model.config.pool_sizes}, file)
    dist.barrier()


def train_step(model, inputs: torch.Tensor, rows: list[str], report: str, save_directory: str) -> None:
    """One FSDP2 training step, each rank on its own rows of a mixed batch (data parallel); the
    gradients, gathered whole, go to `report` (a torch file) from rank 0; then a save."""
    rank, ranks = dist.get_rank(), dist.get_world_size()
    share = len(rows) // ranks
    mine = slice(rank * share, (rank + 1) * share)
    model.train()
    try:
        model(input_ids=inputs[mine], tenant_names=rows[mine], labels=inputs[mine]).loss.backward()
    except ValueError as error:  # every rank refuses alike
        if rank == 0:
            torch.save({"refused": str(error)}, report)
        return
    gradients = {
        name: parameter.grad.full_tensor() if isinstance(parameter.grad, DTensor) else parameter.grad
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    }
    sharded = all(isinstance(parameter, DTensor) for parameter in model.parameters())
    model.save_pretrained(save_directory)  # gathered, written by rank 0 with the model's own remote code
    if rank == 0:
        torch.save({"gradients": gradients, "sharded": sharded}, report)
    dist.barrier()


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    finally:
        # Leave together and close the process group, also after a refusal: a rank exiting with the
        # group open can abort in gloo's teardown ("terminate called without an active exception").
        # The model is collected first: its sharded parameters' device mesh holds the group, and a
        # model kept alive by a reference cycle (after a refused call) would otherwise release it
        # only while the interpreter exits, where gloo's threads then abort the process.
        gc.collect()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
