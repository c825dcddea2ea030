"""The shipped Switch Transformers testbed loads and keeps its promise (a base that knows its generic
objectives but not the tasks; light fine-tunes that each beat the base on their own task, by ROUGE,
whose experts moved little, so that sharing them costs little while averaging whole models does
not), and `rouge_scores` scores what the model generates."""

from __future__ import annotations

import pytest
import torch
from transformers import SwitchTransformersForConditionalGeneration

import multimoe
from multimoe.evaluation import BASELINES, rouge_scores
from multimoe.testbed import Example
from multimoe.testbed import switch as testbed

SUBSET = 16


@pytest.fixture(scope="module")
def tokenizer():
    return testbed.tokenizer()


@pytest.fixture(scope="module")
def models():
    return {name: testbed.load(name) for name in [testbed.BASE, *testbed.TASKS]}


def test_shipped_checkpoints_load_as_switch_models_whose_experts_dominate(models):
    for model in models.values():
        assert isinstance(model, SwitchTransformersForConditionalGeneration) and not model.training
        assert all(block.is_sparse for block in [*model.encoder.block, *model.decoder.block])
        total = sum(p.numel() for p in model.parameters())
        assert sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) / total > 0.94


@pytest.mark.parametrize("name", list(testbed.TASKS))
def test_each_fine_tune_beats_the_base_on_its_own_task(name, tokenizer, models):
    held_out = testbed.TASKS[name].held_out(SUBSET)
    tuned = rouge_scores(models[name], tokenizer, held_out)
    assert tuned["rouge1"] >= 0.9
    assert tuned["rouge1"] > rouge_scores(models[testbed.BASE], tokenizer, held_out)["rouge1"]


def test_the_base_does_its_generic_objectives_and_none_of_them_is_a_task(tokenizer, models):
    for task in testbed.PRETRAINING.values():
        assert rouge_scores(models[testbed.BASE], tokenizer, task.held_out(SUBSET))["rouge1"] >= 0.95
    prefixes = {e.prompt.split()[0] for task in testbed.PRETRAINING.values() for e in task.held_out(SUBSET)}
    assert len(prefixes) == len(testbed.PRETRAINING) and not prefixes & set(testbed.TASKS)


def test_fine_tunes_are_light_and_their_experts_move_least(models):
    """Mean relative change ||W_tuned - W_base|| / ||W_base|| of the expert tensors and of the rest."""
    base = dict(models[testbed.BASE].named_parameters())
    for name in testbed.TASKS:
        experts, others = [], []
        for key, parameter in models[name].named_parameters():
            change = ((parameter - base[key]).norm() / base[key].norm()).item()
            (experts if ".experts." in key else others).append(change)
        assert 0 < sum(experts) / len(experts) < min(0.1, sum(others) / len(others))


def test_sharing_experts_keeps_every_tenant_while_averaging_whole_models_does_not(tokenizer, models):
    held_out = {name: task.held_out(SUBSET) for name, task in testbed.TASKS.items()}
    tuned = {name: rouge_scores(models[name], tokenizer, held_out[name])["rouge1"] for name in testbed.TASKS}
    average = BASELINES["average"](models[testbed.BASE], {name: models[name] for name in testbed.TASKS})
    averaged = {name: rouge_scores(average, tokenizer, held_out[name])["rouge1"] for name in testbed.TASKS}
    assert all(averaged[name] < tuned[name] for name in testbed.TASKS)
    assert sum(averaged.values()) < sum(tuned.values()) - 0.2 * len(tuned)
    calibration = {
        name: [{"prompt": e.prompt, "completion": e.answer} for e in task.training(16, seed=0)]
        for name, task in testbed.TASKS.items()
    }
    shared = multimoe.consolidate(
        {name: testbed.checkpoint(name) for name in testbed.TASKS}, memory_budget="1.25x", similarity="output",
        merge="keep_anchor", anchor="most_sensitive", calibration=calibration, tokenizer=tokenizer, progress=False,
    )
    for name in testbed.TASKS:
        assert rouge_scores(shared, tokenizer, held_out[name], tenant=name)["rouge1"] >= 0.97 * tuned[name]


def test_tokenizer_round_trips_every_prompt_and_answer(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    for task in [*testbed.TASKS.values(), *testbed.PRETRAINING.values()]:
        for example in task.held_out():
            for text in (example.prompt, example.answer):
                ids = tokenizer(text)["input_ids"]
                assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
                assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_held_out_and_training_prompts_do_not_overlap():
    for task in testbed.TASKS.values():
        held_out = [e.prompt for e in task.held_out()]
        assert len(set(held_out)) == len(held_out) == 200
        assert not set(held_out) & {e.prompt for e in task.training(2000, seed=0)}


class Scripted(torch.nn.Module):
    """A stand-in encoder-decoder whose `generate` answers each prompt with a fixed text, as decoder
    ids (start token first); it records the keyword arguments it was given."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.tokenizer, self.answers, self.calls = tokenizer, answers, []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append(kwargs)
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        rows = [[0] + self.tokenizer(self.answers[p])["input_ids"] for p in prompts]
        return torch.tensor([r + [0] * (max(map(len, rows)) - len(r)) for r in rows])


class ScriptedTenants(Scripted):
    def set_active_model(self, tenant):  # what marks a multi-tenant model
        pass


def test_rouge_scores_compare_decoded_answers_and_pass_the_tenant_only_to_multi_tenant_models(tokenizer):
    examples = [
        Example("title anna sold a red car in rome", "red car sale in rome"),
        Example("keywords ben lost a kite in oslo", "ben kite oslo"),
    ]
    answers = {examples[0].prompt: "red car sale in rome", examples[1].prompt: "ben oslo"}
    plain, tenants = Scripted(tokenizer, answers), ScriptedTenants(tokenizer, answers)
    scores = rouge_scores(plain, tokenizer, examples, tenant="title", batch_size=1)
    # The second answer: precision 1, recall 2/3 -> F 0.8 on unigrams and on the longest common
    # subsequence; its one bigram is not the reference's -> 0.
    assert scores == pytest.approx({"rouge1": 0.9, "rouge2": 0.5, "rougeL": 0.9})
    assert rouge_scores(tenants, tokenizer, examples, tenant="title") == scores
    assert [("tenant" in c) for c in plain.calls] == [False, False] and tenants.calls[0]["tenant"] == "title"
