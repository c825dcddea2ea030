"""One quality harness for both shipped testbeds: the Switch testbed's tasks calibrate and score its
tenants (ROUGE) as the Mixtral testbed's do (exact match), and a single tenant is served alone."""

from __future__ import annotations

import pytest
import torch

import multimoe
from multimoe.evaluation import exact_match, no_reconfiguration, rouge_scores, score_tenants
from multimoe.evaluation.presets import PRESETS, calibration_pairs, consolidate_preset
from multimoe.evaluation.testbeds import TESTBEDS, exact_match_scores
from multimoe.testbed import switch

SUBSET = 12


@pytest.fixture(scope="module")
def tokenizer():
    return switch.tokenizer()


@pytest.fixture(scope="module")
def pair():
    return {name: switch.load(name) for name in ("keywords", "title")}


@pytest.mark.parametrize("name", sorted(TESTBEDS))
def test_each_testbed_scores_its_fine_tunes_with_its_own_metrics(name):
    testbed = TESTBEDS[name]
    task = next(iter(testbed.tasks))
    scores = testbed.score(testbed.load(task), testbed.tokenizer(), testbed.tasks[task].held_out(SUBSET))
    assert tuple(scores) == testbed.metrics and len(testbed.metric_labels) == len(testbed.metrics)
    assert scores[testbed.metrics[0]] >= 0.9
    assert testbed.presets[0] == "multimoe" and set(testbed.presets) <= set(PRESETS)


def test_exact_match_scores_is_exact_match_by_name():
    mixtral = TESTBEDS["mixtral"]
    held_out = mixtral.tasks["add"].held_out(SUBSET)
    model, tokenizer = mixtral.load("add"), mixtral.tokenizer()
    assert exact_match_scores(model, tokenizer, held_out) == {"exact_match": exact_match(model, tokenizer, held_out)}


def test_calibration_pairs_come_from_the_given_tasks_and_never_a_held_out_prompt():
    pairs = calibration_pairs(["title"], 8, registry=switch.TASKS)
    assert len(pairs) == 8 and all(p["prompt"].startswith("title ") for p in pairs)
    held_out = {e.prompt for e in switch.TASKS["title"].held_out()}
    assert not held_out & {p["prompt"] for p in pairs}
    assert calibration_pairs(["add"], 2)[0]["prompt"].endswith("=")  # the Mixtral testbed's, by default


def test_score_tenants_with_rouge_scores_each_tenant_as_its_source(tokenizer, pair):
    model = multimoe.from_models(pair)  # lossless
    tasks = {name: switch.TASKS[name].held_out(SUBSET) for name in pair}
    scores = score_tenants(model, tokenizer, tasks, metric=rouge_scores)
    assert scores == score_tenants(pair, tokenizer, tasks, metric=rouge_scores)
    assert set(scores["title"]) == {"rouge1", "rouge2", "rougeL"}


def test_one_tenant_is_served_alone_whatever_the_preset(tokenizer, pair):
    alone = {"title": pair["title"]}
    model = consolidate_preset(alone, "multimoe", "1.0x", tokenizer, registry=switch.TASKS)
    assert model.tenants == ["title"] and model.memory_report().saving == 0
    batch = tokenizer(["title anna sold a red car in rome"], return_tensors="pt")
    settings = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**batch, tenant="title", **settings), pair["title"].generate(**batch, **settings))
    with pytest.raises(ValueError, match="below one tenant served alone"):
        consolidate_preset(alone, "paper", "0.9x", tokenizer, registry=switch.TASKS)
    with pytest.raises(KeyError):
        consolidate_preset(alone, "no such preset", "1.0x", tokenizer)


def test_switch_tenants_consolidate_with_a_preset_and_lose_reconfiguration(tokenizer, pair):
    model = consolidate_preset(pair, "multimoe", "1.25x", tokenizer, registry=switch.TASKS)
    assert model.consolidation_report.settings["merge"] == "keep_anchor"
    report = model.memory_report()
    assert report.total_bytes <= 1.25 * report.source_models_bytes / 2
    shared = no_reconfiguration(model)
    first, second = (list(shared.tenant_modules(n).values()) for n in pair)
    for a, b in zip(first, second):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    assert shared.model.shared["keywords"].weight is shared.lm_head["keywords"].weight  # still tied
