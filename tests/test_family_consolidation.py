"""consolidate, add_tenant and `multimoe consolidate` for every registered causal family, with the same options
(Switch Transformers: tests/test_switch.py).

Each family's tenants are fine-tunes of one tiny random base that move different experts, so some
experts are bit-identical across tenants and the others are close: threshold 0 must share exactly
the identical ones, a budget must merge further, and output-based settings must run the family's
own experts (gpt-oss: transposed, interleaved, with biases; Qwen and DeepSeek: with dense layers).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import multimoe
from multimoe import FAMILIES, classes_for, consolidate
from multimoe.cli import main
from multimoe.testing import fine_tune, random_model, tiny_config

CALIBRATION = ["hello there", "what is 2+2? 4", "sort dcba: abcd"]


@pytest.fixture(scope="module", params=sorted(name for name, family in FAMILIES.items() if not family.is_encoder_decoder))
def tuned(request) -> dict:
    """`a` and `b` fine-tune `base` (experts {0, 1} and {1, 3} move); `c`, the tenant added later, moves {2}."""
    base = random_model(tiny_config(request.param), seed=0)
    return {
        "base": base,
        "a": fine_tune(base, seed=1, changed_experts={0, 1}),
        "b": fine_tune(base, seed=2, changed_experts={1, 3}),
        "c": fine_tune(base, seed=3, changed_experts={2}),
    }


def sources(tuned: dict) -> dict:
    return {name: tuned[name] for name in ("base", "a", "b")}


def logits(model, batch, **tenant) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, **tenant).logits[batch["attention_mask"].bool()]


def test_threshold_zero_equals_from_models_and_a_budget_shares_more(tuned, batch):
    tenants = sources(tuned)
    lossless = consolidate(tenants, progress=False)
    reference = multimoe.from_models(tenants).eval()
    assert type(lossless) is type(reference) is classes_for(FAMILIES[tuned["base"].config.model_type])[2]
    assert lossless.config.pool_sizes == reference.config.pool_sizes
    for name in tenants:
        torch.testing.assert_close(
            logits(lossless, batch, tenant=name), logits(reference, batch, tenant=name), rtol=0, atol=1e-5
        )

    report = lossless.consolidation_report
    budget = report.bytes_after - 1  # one merge beyond the identical experts
    shared = consolidate(tenants, memory_budget=budget, merge="average", progress=False)
    assert shared.consolidation_report.deciding_limit == "memory_budget"
    assert shared.consolidation_report.bytes_after <= budget
    assert sum(shared.config.pool_sizes) == sum(lossless.config.pool_sizes) - 1
    prompt = batch["input_ids"].shape[1]
    for name in tenants:
        output = shared.generate(**batch, tenant=name, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                 pad_token_id=0)
        assert output.shape == (2, prompt + 3), name


def test_output_similarity_with_calibration_runs_the_familys_experts(tuned, tokenizer):
    model = consolidate(
        sources(tuned), similarity="output", merge="output_medoid", anchor="most_sensitive", max_quality_loss=0.05,
        calibration=CALIBRATION, tokenizer=tokenizer, progress=False,
    )
    report = model.consolidation_report
    sparse = [index for index, size in enumerate(model.config.pool_sizes) if size]
    assert [layer.layer for layer in report.layers] == sparse  # dense layers have no pool to report
    assert sum(layer.merged for layer in report.layers) > 0
    for name in report.tenants:
        assert report.loss_after[name] <= report.loss_before[name] * 1.05 + 1e-6, name
    assert "calibration loss before" in report.to_markdown()


def test_add_tenant_reproduces_the_new_fine_tune_and_leaves_the_others_bit_identical(tuned, batch):
    model = multimoe.from_models({"base": tuned["base"], "a": tuned["a"]}).eval()
    before = {name: logits(model, batch, tenant=name) for name in model.tenants}
    sizes = list(model.config.pool_sizes)
    model.add_tenant("c", tuned["c"])
    assert model.config.pool_sizes == [size + 1 if size else 0 for size in sizes]  # c's one moved expert
    for name, expected in before.items():
        assert torch.equal(logits(model, batch, tenant=name), expected), name
    torch.testing.assert_close(logits(model, batch, tenant="c"), logits(tuned["c"], batch), rtol=0, atol=1e-5)


def test_cli_consolidates_saved_directories_into_the_familys_class(tuned, tmp_path, capsys):
    arguments = ["consolidate", "--threshold", "inf", "--out", str(tmp_path / "out")]
    for name in ("base", "a"):
        tuned[name].save_pretrained(tmp_path / name)
        arguments += ["--tenant", f"{name}={tmp_path / name}"]
    main(arguments)
    assert "shared expert pool" in capsys.readouterr().out
    expected = classes_for(FAMILIES[tuned["base"].config.model_type])[2]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [expected.__name__]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model) is expected and model.tenants == ["base", "a"]
