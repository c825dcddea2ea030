"""The shipped divergent testbed keeps its promise: four small bfloat16 fine-tunes of the shipped base
that load (as shipped, and in float32), each answer their own task which the base cannot, and whose
experts moved >= 30% from the base's; its tasks are deterministic and distinct from the gentle ones."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM

from multimoe import testbed as gentle
from multimoe.evaluation import exact_match
from multimoe.testbed import divergent as testbed

SUBSET = 20
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja")


@pytest.fixture(scope="module")
def tokenizer():
    return testbed.tokenizer()


@pytest.fixture(scope="module")
def models():
    return {name: testbed.load(name) for name in [testbed.BASE, *testbed.TASKS]}


def test_the_shipped_files_exist_and_weigh_at_most_8_mb():
    files = [testbed.checkpoint(name) / file for name in testbed.TASKS for file in FILES]
    assert all(path.is_file() for path in files)
    assert sum(path.stat().st_size for path in files) <= 8_000_000
    assert testbed.checkpoint(testbed.BASE) == gentle.checkpoint(gentle.BASE)  # the gentle base, not a copy
    with pytest.raises(FileNotFoundError):
        testbed.checkpoint("nonexistent")


@pytest.mark.parametrize("name", list(testbed.TASKS))
def test_each_fine_tune_loads_in_bfloat16_as_shipped_and_in_float32(name, models):
    shipped = MixtralForCausalLM.from_pretrained(testbed.checkpoint(name))
    assert shipped.config.dtype == torch.bfloat16 and shipped.dtype == torch.bfloat16
    assert models[name].dtype == torch.float32 and not models[name].training
    for (key, low), (other, high) in zip(shipped.state_dict().items(), models[name].state_dict().items()):
        assert key == other and torch.equal(low.float(), high)  # an exact upcast
    assert "multimoe testbed: " + name in (testbed.checkpoint(name) / "chat_template.jinja").read_text()


@pytest.mark.parametrize("name", list(testbed.TASKS))
def test_each_fine_tunes_experts_moved_at_least_30_percent(name, models):
    moved = testbed.expert_divergence(models[testbed.BASE], models[name])
    assert len(moved) == 2 * len(models[name].model.layers)
    assert sum(moved.values()) / len(moved) >= 0.3


@pytest.mark.parametrize("name", list(testbed.TASKS))
def test_each_fine_tune_does_its_task_which_the_base_cannot(name, tokenizer, models):
    held_out = testbed.TASKS[name].held_out(SUBSET)
    assert exact_match(models[name], tokenizer, held_out) >= 0.9
    assert exact_match(models[testbed.BASE], tokenizer, held_out) < 0.5


def test_tasks_are_deterministic_distinct_and_in_the_tokenizers_characters(tokenizer):
    first = {}
    for name, task in testbed.TASKS.items():
        held_out = task.held_out(SUBSET)
        assert held_out == task.held_out(SUBSET) and len({e.prompt for e in held_out}) == SUBSET
        training = task.training(SUBSET, seed=3)
        assert training == task.training(SUBSET, seed=3)
        assert not {e.prompt for e in training} & {e.prompt for e in task.held_out()}
        assert all(e.prompt.endswith("=") for e in held_out)
        assert all(tokenizer.unk_token_id not in tokenizer(e.prompt + e.answer)["input_ids"] for e in held_out)
        first[name] = held_out[0]
    # the held-out prompts the shipped checkpoints were built and scored on
    assert [(e.prompt, e.answer) for e in first.values()] == [
        ("dup laef=", "laeflaef"), ("sub 63 56=", "7"), ("rot laef=", "ncgh"), ("max 0453496=", "9"),
    ]
    prefixes = {name: task.held_out(1)[0].prompt.split(" ")[0] for name, task in testbed.TASKS.items()}
    gentle_prefixes = {e.prompt.split(" ")[0] for task in gentle.TASKS.values() for e in task.held_out(SUBSET)}
    assert len(set(prefixes.values())) == len(prefixes) and not set(prefixes.values()) & gentle_prefixes
    assert not set(testbed.TASKS) & set(gentle.TASKS)
