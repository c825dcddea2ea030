"""consolidate(): lossless at threshold 0, budgets met exactly, the quality guard, groupings, merges."""

from __future__ import annotations

import copy
import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from multimoe import IncompatibleTenantsError, consolidate
from multimoe.consolidation.calibration import CalibrationData, language_model_loss, per_tenant_data
from multimoe.consolidation.merging import MERGE_RULES, MergeGroup
from multimoe.consolidation.similarity import expert_runner
from multimoe.families import FAMILIES
from multimoe.testing import fine_tune, random_mixtral, tiny_config, tiny_mixtral_config

UNOPENED = {"a": object(), "b": object()}  # opening either fails: errors that come first never touch them
CALIBRATION = ["hello there how are you", "what is 2+2? it is 4", "sort: dcba -> abcd", "reverse abc", "ok then"]


def train(model, tokenizer, texts, steps: int, seed: int):
    """A few full-parameter steps, so that tenants really know their texts (and merging can hurt)."""
    torch.manual_seed(seed)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def family(tokenizer):
    """A base trained on all calibration texts, and two full fine-tunes of it on different parts;
    `code` also keeps experts 0 and 2 of the base untouched."""
    base = train(random_mixtral(tiny_mixtral_config(), seed=0), tokenizer, CALIBRATION, steps=30, seed=0)
    chat = train(copy.deepcopy(base), tokenizer, CALIBRATION[:3], steps=15, seed=1)
    code = fine_tune(base, seed=2, changed_experts={1, 3}, scale=0.1)
    return {"base": base, "chat": chat, "code": code}


def assert_matches_originals(model, originals, batch):
    with torch.no_grad():
        for name, original in originals.items():
            mask = batch["attention_mask"].bool()
            actual = model(**batch, tenant=name).logits[mask]
            torch.testing.assert_close(actual, original(**batch).logits[mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("limits", [{}, {"threshold": 0.0}, {"memory_budget": "100x"}])
def test_threshold_zero_or_unlimited_budget_is_lossless(family, batch, limits):
    model = consolidate(family, progress=False, **limits)
    assert_matches_originals(model, family, batch)
    # only identical experts were shared: base 4 + chat 4 + code 2 per layer
    assert model.config.pool_sizes == [10, 10]


def test_identical_tenants_consolidate_to_one_models_experts(family):
    base = family["base"]
    model = consolidate({"a": base, "b": base, "c": base}, progress=False)
    assert model.config.pool_sizes == [4, 4]
    experts = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if ".mlp.experts." in n)
    assert model.memory_report().pool_bytes == experts


def test_memory_budget_is_met_exactly(family):
    budget = 300_000
    model = consolidate(family, memory_budget=budget, progress=False)
    report = model.consolidation_report
    expert_bytes = 3 * model.config.hidden_size * model.config.intermediate_size * 4
    total = model.memory_report().total_bytes
    assert total == report.bytes_after <= budget < total + expert_bytes  # no merge beyond what fits
    assert report.deciding_limit == "memory_budget"
    one_model = sum(p.numel() * 4 for p in family["base"].parameters())
    relative = consolidate(family, memory_budget="1.5x", progress=False)
    assert relative.memory_report().total_bytes <= 1.5 * one_model


def test_quality_guard_holds_on_calibration_data(family, tokenizer):
    guard = 0.005
    model = consolidate(family, threshold=1e9, similarity="output", merge="average", calibration=CALIBRATION,
                        tokenizer=tokenizer, max_quality_loss=guard, progress=False)
    report = model.consolidation_report
    data = CalibrationData.from_user(CALIBRATION, tokenizer)
    for name, original in family.items():
        before = language_model_loss(original, data)
        after = language_model_loss(model, data, tenant=name)
        assert after <= before * (1 + guard) + 1e-6, name
        assert report.loss_after[name] == pytest.approx(after)
    unguarded = consolidate(family, threshold=1e9, similarity="output", merge="average", calibration=CALIBRATION,
                            tokenizer=tokenizer, progress=False)
    assert max(unguarded.consolidation_report.relative_loss_increase.values()) > guard  # the guard must bind
    assert report.deciding_limit == "max_quality_loss"
    assert sum(model.config.pool_sizes) > sum(unguarded.config.pool_sizes)


def planted_permutation(base, order):
    """`base` with its experts (and router rows) permuted: the same function, other indices."""
    twin = copy.deepcopy(base)
    with torch.no_grad():
        for layer in twin.model.layers:
            layer.mlp.experts.gate_up_proj.copy_(layer.mlp.experts.gate_up_proj[order])
            layer.mlp.experts.down_proj.copy_(layer.mlp.experts.down_proj[order])
            layer.mlp.gate.weight.copy_(layer.mlp.gate.weight[order])
    return twin


def test_cross_index_grouping_finds_a_planted_permutation(family, batch):
    order = torch.tensor([2, 0, 3, 1])
    tenants = {"base": family["base"], "shuffled": planted_permutation(family["base"], order)}
    cross = consolidate(tenants, grouping="cross_index", progress=False)
    assert cross.config.pool_sizes == [4, 4]
    assert cross.config.tenants["shuffled"]["expert_map"][0] == order.tolist()
    assert_matches_originals(cross, tenants, batch)
    same = consolidate(tenants, grouping="same_index", progress=False)
    assert same.config.pool_sizes == [8, 8]


def test_merge_rules_do_what_their_names_say():
    generator = torch.Generator().manual_seed(0)
    members = [(torch.randn(6, 4, generator=generator), torch.randn(4, 3, generator=generator)) for _ in range(3)]
    usage = [1.0, 5.0, 2.0]
    assert MERGE_RULES["select"](MergeGroup(members, usage)) is members[1]
    assert MERGE_RULES["select"](MergeGroup(members)) is members[0]
    assert MERGE_RULES["keep_anchor"](MergeGroup(members, usage)) is members[0]  # the anchor's, however little used
    averaged = MERGE_RULES["average"](MergeGroup(members))
    for part in (0, 1):
        torch.testing.assert_close(averaged[part], sum(m[part] for m in members) / 3)
    weighted = MERGE_RULES["usage_weighted"](MergeGroup(members, usage))
    for part in (0, 1):
        expected = sum(u * m[part] for u, m in zip(usage, members)) / sum(usage)
        torch.testing.assert_close(weighted[part], expected)


def test_output_medoid_keeps_the_member_that_distorts_the_tenants_least():
    generator = torch.Generator().manual_seed(0)
    base = (torch.randn(6, 4, generator=generator), torch.randn(4, 3, generator=generator))
    far, other = (tuple(part + torch.randn(part.shape, generator=generator) for part in base) for _ in range(2))
    inputs = [torch.randn(16, 4, generator=generator) for _ in range(3)]
    members = [far, base, other]
    run_experts = expert_runner(FAMILIES["mixtral"], tiny_config("mixtral", hidden_size=4, intermediate_size=3))
    medoid = MERGE_RULES["output_medoid"]
    assert medoid(MergeGroup(members, inputs=inputs, run_experts=run_experts)) is base  # the centre of the three
    assert medoid(MergeGroup([far, far], inputs=inputs[:2], run_experts=run_experts)) is far


def test_average_merge_end_to_end(family):
    two = {"base": family["base"], "chat": family["chat"]}
    model = consolidate(two, threshold=1e9, grouping="same_index", merge="average", progress=False)
    maps = model.config.tenants
    entry = maps["chat"]["expert_map"][0][0]
    assert entry == maps["base"]["expert_map"][0][0]  # expert 0 moved in chat, now shared
    expected = (family["base"].model.layers[0].mlp.experts.gate_up_proj[0]
                + family["chat"].model.layers[0].mlp.experts.gate_up_proj[0]) / 2
    torch.testing.assert_close(model.model.layers[0].experts.gate_up_proj[entry], expected)


def test_report_markdown_and_heatmap(family, tmp_path):
    model = consolidate(family, memory_budget="1.5x", progress=False)
    text = model.consolidation_report.to_markdown()
    assert "Deciding limit: **memory_budget**" in text and "| 0 | 4 |" in text
    assert "Groups are built around the experts of 'base'." in text
    path = model.consolidation_report.heatmap(tmp_path / "similarity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_report_help_is_its_whole_first_paragraph(capsys, monkeypatch):
    path = Path(__file__).resolve().parents[1] / "scripts" / "quality_report.py"
    spec = importlib.util.spec_from_file_location("quality_report", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", [path.name, "--help"])
    with pytest.raises(SystemExit):
        script.main()
    text = " ".join(capsys.readouterr().out.split())
    assert "each tenant's exact match when 2, 3 or 4 fine-tunes share one model" in text
    assert "Writes docs/quality.md and docs/img/quality_memory.png." in text


@pytest.mark.parametrize(
    "option, error, message",
    [
        ({"threshold": float("nan")}, ValueError, "threshold must be a finite number"),
        ({"threshold": -0.1}, ValueError, "threshold must be at least 0"),
        ({"threshold": "0.5"}, TypeError, "threshold must be a number"),
        ({"max_quality_loss": float("nan")}, ValueError, "max_quality_loss must be a finite number"),
        ({"max_quality_loss": -0.01}, ValueError, "max_quality_loss must be at least 0"),
        ({"memory_budget": float("nan")}, ValueError, "memory_budget must be a finite number"),
        ({"memory_budget": float("inf")}, ValueError, "memory_budget must be a finite number"),
        ({"memory_budget": -1}, ValueError, "memory_budget must be positive"),
        ({"memory_budget": 0}, ValueError, "memory_budget must be positive"),
        ({"memory_budget": True}, TypeError, "memory_budget must be a number, got bool"),
        ({"memory_budget": "nanx"}, ValueError, "memory_budget 'nanx' must be a finite number"),
        ({"memory_budget": "infx"}, ValueError, "memory_budget 'infx' must be a finite number"),
        ({"memory_budget": "-1x"}, ValueError, "memory_budget '-1x' must be positive"),
        ({"memory_budget": "0x"}, ValueError, "memory_budget '0x' must be positive"),
        ({"memory_budget": "lots"}, ValueError, "memory_budget 'lots': give bytes"),
        ({"max_calibration_rows": 0}, ValueError, "max_calibration_rows must be positive"),
        ({"max_calibration_rows": 2.5}, TypeError, "max_calibration_rows must be an int"),
    ],
)
def test_numeric_options_are_checked_before_any_tenant_is_opened(option, error, message):
    with pytest.raises(error, match=message):
        consolidate(UNOPENED, progress=False, **option)


@pytest.mark.parametrize(
    "limits, deciding, pools",
    [
        ({}, "threshold", [10, 10]),  # the default threshold 0 keeps every non-identical pair apart
        ({"threshold": math.inf}, "none (every expert shared)", [4, 4]),
        ({"memory_budget": "3x"}, "none (identical experts only; the budget does not bind)", [10, 10]),
        ({"memory_budget": 300_000}, "memory_budget", [5, 5]),
    ],
)
def test_deciding_limit_is_the_one_that_stopped_sharing(family, limits, deciding, pools):
    model = consolidate(family, progress=False, **limits)
    assert model.consolidation_report.deciding_limit == deciding
    assert model.config.pool_sizes == pools


def test_quality_bound_alone_shares_as_much_as_it_allows(family, tokenizer):
    bound = 0.02
    model = consolidate(family, calibration=CALIBRATION, tokenizer=tokenizer, max_quality_loss=bound, progress=False)
    report = model.consolidation_report
    assert report.deciding_limit == "max_quality_loss"
    assert sum(model.config.pool_sizes) < 20  # beyond the identical experts (10 per layer)
    for name in family:
        assert report.loss_after[name] <= report.loss_before[name] * (1 + bound) + 1e-6, name


def test_quality_bound_stops_short_of_a_budget_and_says_so(family, tokenizer):
    two = {"base": family["base"], "chat": family["chat"]}
    with pytest.warns(UserWarning, match="memory_budget not reached"):
        model = consolidate(two, memory_budget="1.6x", similarity="output", calibration=CALIBRATION,
                            tokenizer=tokenizer, max_quality_loss=0.0, progress=False)
    report = model.consolidation_report
    assert report.deciding_limit == "max_quality_loss"
    assert report.bytes_after == model.memory_report().total_bytes > report.budget_bytes
    assert re.search(r"memory_budget not reached: .* stops at \d+ bytes \(2x one model\), above the budget of "
                     r"\d+ bytes \(1.6x one model\)", report.to_markdown())


@pytest.mark.parametrize(
    "limits, reason",
    [
        ({"memory_budget": 1000}, "at all"),  # below one model's experts
        ({"memory_budget": "1x"}, "at all"),  # above them, below them plus both tenants' own layers
        ({"memory_budget": "1.6x", "threshold": 0.0}, "within threshold 0.0"),
    ],
)
def test_unreachable_budget_names_its_multiple_and_the_smallest_reachable_one(family, limits, reason):
    two = {"base": family["base"], "chat": family["chat"]}
    pattern = rf"of \d+ bytes \([\d.]+x one model\) is unreachable {reason}.*smallest reachable budget is '([\d.]+x)'"
    with pytest.raises(ValueError, match=pattern) as error:
        consolidate(two, progress=False, **limits)
    smallest = re.search(pattern, str(error.value)).group(1)
    report = consolidate(two, progress=False, **{**limits, "memory_budget": smallest}).consolidation_report
    assert report.bytes_after <= report.budget_bytes


def test_clear_errors(family, tokenizer):
    two = {"base": family["base"], "chat": family["chat"]}
    with pytest.raises(ValueError, match="at least two tenants"):
        consolidate({"base": family["base"]}, progress=False)
    with pytest.raises(ValueError, match="Unknown similarity metric 'cosine'"):
        consolidate(two, similarity="cosine", progress=False)
    with pytest.raises(ValueError, match="Unknown merge rule 'mean'"):
        consolidate(two, merge="mean", progress=False)
    with pytest.raises(ValueError, match="need calibration data"):
        consolidate(two, similarity="output", progress=False)
    with pytest.raises(ValueError, match="Calibration data is empty"):
        consolidate(two, similarity="output", calibration=[], progress=False)
    with pytest.raises(ValueError, match="exactly the keys 'prompt' and 'completion'"):
        consolidate(two, similarity="output", calibration=[{"prompt": "2+2=", "answer": "4"}], tokenizer=tokenizer,
                    progress=False)
    with pytest.raises(ValueError, match="anchor 'nobody' is neither a tenant"):
        consolidate(two, anchor="nobody", progress=False)
    with pytest.raises(ValueError, match="anchor='most_sensitive'.*need calibration data"):
        consolidate(two, anchor="most_sensitive", progress=False)
    with pytest.raises(ValueError, match="anchor 'first' is ambiguous"):
        consolidate({"base": family["base"], "first": family["chat"]}, anchor="first", progress=False)
    with pytest.raises(ValueError, match="two strings"):
        consolidate(two, similarity="output", calibration=[{"prompt": [{"role": "user"}], "completion": "4"}],
                    tokenizer=tokenizer, progress=False)
    other = random_mixtral(tiny_mixtral_config(hidden_size=64), seed=3)
    with pytest.raises(IncompatibleTenantsError, match="hidden_size"):
        consolidate({"base": family["base"], "other": other}, progress=False)


def test_per_tenant_calibration_measures_each_tenant_on_its_own_data(family, tokenizer):
    own = {"base": CALIBRATION, "chat": CALIBRATION[:3], "code": CALIBRATION[3:]}
    model = consolidate(family, memory_budget="1.6x", similarity="output", merge="usage_weighted",
                        calibration=own, tokenizer=tokenizer, progress=False)
    report = model.consolidation_report
    for name, texts in own.items():
        data = CalibrationData.from_user(texts, tokenizer)
        assert report.loss_before[name] == pytest.approx(language_model_loss(family[name], data))
        assert report.loss_after[name] == pytest.approx(language_model_loss(model, data, tenant=name))
    with pytest.raises(ValueError, match="must name exactly the tenants"):
        consolidate(family, similarity="output", calibration={"base": CALIBRATION}, tokenizer=tokenizer,
                    progress=False)


def test_prompt_completion_calibration_scores_only_the_completion(family, tokenizer):
    pairs = [{"prompt": "what is 2+2? ", "completion": "four"}, {"prompt": "sort dcba: ", "completion": "abcd"}]
    data = CalibrationData.from_user(pairs, tokenizer)
    for row, pair in enumerate(pairs):
        completion = tokenizer(pair["prompt"] + pair["completion"])["input_ids"][len(tokenizer(pair["prompt"])["input_ids"]):]
        assert data.labels[row][data.labels[row] != -100].tolist() == completion
    model = family["chat"]
    total, count = 0.0, 0
    with torch.no_grad():
        for pair in pairs:
            prompt = tokenizer(pair["prompt"])["input_ids"]
            ids = torch.tensor([tokenizer(pair["prompt"] + pair["completion"])["input_ids"]])
            log_probs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, 1:]
            scored = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
            total -= float(log_probs[scored, targets[scored]].sum())
            count += len(scored)
    assert language_model_loss(model, data) == pytest.approx(total / count, rel=1e-4)


def test_pair_scoring_starts_where_prompt_and_full_tokenizations_part(tokenizer):
    end = tokenizer.eos_token_id

    def with_end_token(text):  # a tokenizer that appends EOS: the prompt's ids are no prefix of the pair's
        return {"input_ids": tokenizer(text)["input_ids"] + [end]}

    data = CalibrationData.from_user([{"prompt": "sort dcba: ", "completion": "abcd"}], with_end_token)
    prompt = tokenizer("sort dcba: ")["input_ids"]
    completion = tokenizer("sort dcba: abcd")["input_ids"][len(prompt):]
    assert data.labels[0][data.labels[0] != -100].tolist() == completion + [end]


def test_calibration_accepts_one_pair_and_tensor_rows(tokenizer):
    pair = {"prompt": "sort dcba: ", "completion": "abcd"}
    one, listed = CalibrationData.from_user(pair, tokenizer), CalibrationData.from_user([pair], tokenizer)
    assert torch.equal(one.labels, listed.labels)
    assert per_tenant_data(pair, ["a", "b"], tokenizer)["b"].labels.tolist() == listed.labels.tolist()
    rows = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    assert CalibrationData.from_user(rows).input_ids.tolist() == [[5, 6, 7], [0, 8, 9]]


def test_anchor_by_name_and_a_probe_with_nothing_to_measure(family, tokenizer, batch):
    named = consolidate(family, memory_budget="1.6x", merge="keep_anchor", anchor="chat", progress=False)
    report = named.consolidation_report
    assert report.anchor == "chat" and report.compared == "base"
    with torch.no_grad():  # keep_anchor: the anchor's experts survive, so it is exact
        torch.testing.assert_close(named(**batch, tenant="chat").logits, family["chat"](**batch).logits)
    lossless = consolidate(family, anchor="most_sensitive", calibration=CALIBRATION, tokenizer=tokenizer,
                           progress=False)
    assert lossless.consolidation_report.anchor == "base"
    assert "no probe, only identical experts are shared" in lossless.consolidation_report.notes[0]
