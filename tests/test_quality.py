"""The quality harness scores correctly, the shipped testbed holds its promise, and the demo runs."""

from __future__ import annotations

import pytest
import torch

from multimoe import MultiTenantMixtralForCausalLM, testbed
from multimoe.evaluation import exact_match, no_reconfiguration, perplexity, score_tenants
from multimoe.evaluation.harness import generate_answers
from multimoe.testbed import Example

SUBSET = 100


class Scripted(torch.nn.Module):
    """A stand-in causal LM whose `generate` appends a fixed continuation per prompt."""

    def __init__(self, tokenizer, continuations: dict[str, str]):
        super().__init__()
        self.tokenizer, self.continuations = tokenizer, continuations

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        rows = [self.tokenizer(self.continuations[p])["input_ids"] + [self.tokenizer.eos_token_id] for p in prompts]
        width = max(len(r) for r in rows)
        tails = torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, tails[:, :max_new_tokens]], dim=1)


@pytest.fixture(scope="module")
def tokenizer():
    return testbed.tokenizer()


@pytest.fixture(scope="module")
def fine_tunes():
    return {name: testbed.load(name) for name in testbed.TASKS}


def test_exact_match_counts_only_exact_answers(tokenizer):
    examples = [Example("12+34=", "46"), Example("rev abc=", "cba"), Example("sort cab=", "abc"), Example("a1?a=", "1")]
    # right, right, a prefix of the answer, a longer answer: 2 of 4 exactly right.
    model = Scripted(tokenizer, {"12+34=": "46", "rev abc=": "cba", "sort cab=": "ab", "a1?a=": "12"})
    assert exact_match(model, tokenizer, examples, batch_size=3) == 0.5


def test_generate_answers_stop_at_end_of_sequence(tokenizer, fine_tunes):
    answers = generate_answers(fine_tunes["add"], tokenizer, ["12+34=", "50+50=", "99+99="], max_new_tokens=8)
    assert answers == ["46", "100", "198"]


@pytest.mark.parametrize("name", list(testbed.TASKS))
def test_shipped_fine_tune_scores_at_least_90_percent_on_its_task(name, tokenizer, fine_tunes):
    held_out = testbed.TASKS[name].held_out(SUBSET)
    assert exact_match(fine_tunes[name], tokenizer, held_out) >= 0.9
    # It is specialised: its own task is easier for it than for the base it was tuned from.
    assert perplexity(fine_tunes[name], tokenizer, held_out) < perplexity(testbed.load(testbed.BASE), tokenizer, held_out)


def test_multi_tenant_model_scores_each_tenant_as_its_source(tokenizer, fine_tunes):
    pair = {name: fine_tunes[name] for name in ("add", "reverse")}
    model = MultiTenantMixtralForCausalLM.from_models(pair)  # lossless
    tasks = {name: testbed.TASKS[name].held_out(40) for name in pair}
    assert score_tenants(model, tokenizer, tasks) == score_tenants(pair, tokenizer, tasks)
    held_out = tasks["add"]
    assert perplexity(model, tokenizer, held_out, tenant="add") == pytest.approx(perplexity(pair["add"], tokenizer, held_out), rel=1e-4)


def test_no_reconfiguration_gives_every_tenant_the_same_own_layers(fine_tunes):
    model = MultiTenantMixtralForCausalLM.from_models({name: fine_tunes[name] for name in ("add", "sort")})
    shared = no_reconfiguration(model)
    first, second = (list(shared.tenant_modules(n).values()) for n in ("add", "sort"))
    for a, b in zip(first, second):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    assert torch.equal(shared.model.layers[0].experts.gate_up_proj, model.model.layers[0].experts.gate_up_proj)


def test_most_sensitive_anchor_keeps_the_fragile_tenant_whatever_the_order(tokenizer, fine_tunes):
    """Listed second, `add` (the one task whose answers depend on its own experts) would lose its
    experts under the paper's rule; the probe finds it and keeps them, so it stays exact."""
    from multimoe.evaluation.presets import consolidate_preset

    order = {"reverse": fine_tunes["reverse"], "add": fine_tunes["add"]}
    model = consolidate_preset(order, "multimoe", "1.1x", tokenizer)
    assert model.consolidation_report.anchor == "add"
    assert model.consolidation_report.bytes_after <= 1.1 * model.memory_report().source_models_bytes / 2
    ids = tokenizer(["12+34=", "99+1="], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**ids, tenant="add").logits, fine_tunes["add"](**ids).logits)
    held_out = testbed.TASKS["add"].held_out(SUBSET)
    paper = consolidate_preset(order, "paper", "1.1x", tokenizer)
    ours, theirs = (exact_match(m, tokenizer, held_out, tenant="add") for m in (model, paper))
    assert ours == exact_match(fine_tunes["add"], tokenizer, held_out) > theirs


def test_demo_runs_end_to_end(capsys):
    from multimoe.demo import main

    scores = main(examples=20)
    printed = capsys.readouterr().out
    assert "memory saved" in printed
    for name in testbed.TASKS:
        assert f"| {name} |" in printed
        assert scores[name][0] >= 0.9


def test_switch_demo_runs_end_to_end(capsys):
    from multimoe.demo import main
    from multimoe.testbed import switch

    scores = main(examples=10, family="switch")
    printed = capsys.readouterr().out
    assert "Switch Transformers tenants" in printed and "ROUGE-1 on 10 held-out prompts" in printed
    for name in switch.TASKS:
        assert f"| {name} |" in printed
        assert scores[name][0] >= 0.95 and scores[name][1] >= 0.97 * scores[name][0]
