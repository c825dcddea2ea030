"""Per-tenant low-rank expert deltas (`consolidate(delta_rank=...)`, `multimoe.expert_deltas`) for
every registered family: a full-rank delta restores each tenant's own experts, so every tenant must
reproduce its original model, alone and in mixed batches; rank 0 is today's model bit for bit; the
bytes count against the budget; save/load, remote code, add_tenant and the model card carry them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import multimoe
from multimoe import FAMILIES, consolidate
from multimoe.testing import fine_tune, random_model, run_without_multimoe, tiny_config

CAUSAL = sorted(name for name, family in FAMILIES.items() if not family.is_encoder_decoder)
EVERYTHING = dict(threshold=math.inf, merge="keep_anchor")  # every expert merged into the anchor's
FULL_RANK = 10_000  # capped at each expert's largest possible rank


@pytest.fixture(scope="module", params=[*CAUSAL, "switch_transformers"])
def tuned(request) -> dict:
    """Three fine-tunes of one tiny random base; every expert moves in `a` and `b`."""
    base = random_model(tiny_config(request.param), seed=0)
    experts = range(multimoe.families.routed_experts(base.config))
    return {
        "base": base,
        "a": fine_tune(base, seed=1, changed_experts=experts, scale=0.1),
        "b": fine_tune(base, seed=2, changed_experts=experts, scale=0.1),
    }


def middle_budget(tuned: dict) -> int:
    """Bytes halfway between every expert shared and none: a budget each tiny family can reach."""
    smallest = consolidate(tuned, **EVERYTHING, progress=False).consolidation_report.bytes_after
    return (smallest + consolidate(tuned, progress=False).consolidation_report.bytes_after) // 2


def inputs(model, batch) -> dict:
    if model.config.is_encoder_decoder:
        return dict(batch, decoder_input_ids=batch["input_ids"][:, :3])
    return dict(batch)


def logits(model, batch, **tenant) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(model, batch), **tenant).logits


def test_full_rank_deltas_reproduce_every_tenant_alone_and_mixed(tuned, batch):
    model = consolidate(tuned, **EVERYTHING, delta_rank=FULL_RANK, progress=False)
    without = consolidate(tuned, **EVERYTHING, progress=False)
    assert model.config.pool_sizes == without.config.pool_sizes  # one pool: the anchor's experts
    assert model.memory_report().delta_bytes > 0
    for name, original in tuned.items():
        expected = logits(original, batch)
        torch.testing.assert_close(logits(model, batch, tenant=name), expected, rtol=0, atol=1e-4)
        if name != "base":  # the anchor keeps its experts: without deltas the others drift
            assert (logits(without, batch, tenant=name) - expected).abs().max() > 1e-3
    one_token = {key: value[:, -1:] for key, value in batch.items()}  # a few picks: only their experts' deltas run
    for name, original in tuned.items():
        expected = logits(original, one_token)
        torch.testing.assert_close(logits(model, one_token, tenant=name), expected, rtol=0, atol=1e-4)
    rows = ["a", "base"]
    mixed = logits(model, batch, tenant_names=rows)
    for row, name in enumerate(rows):
        alone = logits(model, {key: value[row : row + 1] for key, value in batch.items()}, tenant=name)
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=0, atol=1e-5)


def test_deltas_on_some_experts_only_decode_token_by_token(tuned, batch):
    """Only expert 0 moved in `b`: its other experts need no delta, and a step whose picks reach
    none of its deltas adds nothing (of the product's own width, transposed layouts too)."""
    some = {"base": tuned["base"], "b": fine_tune(tuned["base"], seed=5, changed_experts={0}, scale=0.1)}
    model = consolidate(some, **EVERYTHING, delta_rank=FULL_RANK, progress=False)
    ranks = [rank for row in model.config.tenants["b"]["delta_ranks"] for rank in row]
    assert any(ranks) and not all(ranks)
    for position in range(batch["input_ids"].shape[1]):
        step = {key: value[:, position : position + 1] for key, value in batch.items()}
        for name, original in some.items():
            torch.testing.assert_close(logits(model, step, tenant=name), logits(original, step), rtol=0, atol=1e-4)


def test_the_budget_holds_whatever_member_the_rule_keeps(tenants, tokenizer):
    """`select` with usage may keep a member other than the anchor's, and `average` changes every
    member (identical ones too): the deltas made are the ones the plan counted."""
    sources = {name: tenants[name] for name in ("base", "chat", "code")}
    calibration = ["hello there", "how are you? fine", "def f(x): return x"]
    smallest = consolidate(sources, **EVERYTHING, progress=False).consolidation_report.bytes_after
    largest = consolidate(sources, progress=False).consolidation_report.bytes_after
    for merge in ("select", "average", "output_medoid"):
        for budget in range(smallest + (largest - smallest) // 4, largest, (largest - smallest) // 8):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # an exceeded budget warns
                model = consolidate(sources, memory_budget=budget, merge=merge, delta_rank=2, calibration=calibration,
                                    tokenizer=tokenizer, progress=False)
            assert model.memory_report().total_bytes <= budget, (merge, budget)


def test_no_delta_rank_is_todays_model_bit_for_bit(tuned, batch):
    budget = middle_budget(tuned)
    today = consolidate(tuned, memory_budget=budget, merge="keep_anchor", progress=False)
    for none in (None, 0):
        model = consolidate(tuned, memory_budget=budget, merge="keep_anchor", delta_rank=none, progress=False)
        assert model.state_dict().keys() == today.state_dict().keys()
        assert all(torch.equal(tensor, today.state_dict()[key]) for key, tensor in model.state_dict().items())
        assert "delta_ranks" not in str(model.config.to_dict())
        for name in tuned:
            assert torch.equal(logits(model, batch, tenant=name), logits(today, batch, tenant=name))


def test_a_delta_is_the_truncated_svd_of_the_tenants_difference(tuned):
    rank = 2
    model = consolidate(tuned, **EVERYTHING, delta_rank=rank, progress=False)
    config, family = model.config, model.config.family
    paths = family.experts_modules(tuned["a"].config)
    for layer_idx, layer in enumerate(model.model.layers):
        if not hasattr(layer, "experts"):
            continue
        names = family.expert_parameter_names(config)
        own = dict(zip(names, family.stacked_experts(config, tuned["a"].get_submodule(paths[layer_idx]))))
        pool = dict(zip(names, family.stacked_experts(config, layer.experts)))
        deltas = layer.tenants["a"].get_submodule(layer.experts_path)
        for expert, entry in enumerate(config.expert_map("a", layer_idx)):
            for name, tensor in own.items():
                difference = (tensor[expert] - pool[name][entry]).double()
                if difference.dim() == 1:  # a bias keeps its whole difference
                    (bias,) = multimoe.expert_deltas.delta_names(name, False)
                    torch.testing.assert_close(getattr(deltas, bias)[deltas.layout.row(expert)].double(), difference)
                    continue
                span = deltas.layout.span(expert, deltas.caps[name])
                keys = multimoe.expert_deltas.delta_names(name, True)
                left, right = (getattr(deltas, key)[span].double() for key in keys)
                residual = torch.linalg.svdvals(difference)[rank:].square().sum().sqrt()
                torch.testing.assert_close((difference - left.T @ right).norm(), residual, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("delta_rank", [2, "auto"])
def test_deltas_count_against_the_memory_budget(tuned, delta_rank):
    model = consolidate(tuned, memory_budget=middle_budget(tuned), merge="keep_anchor", delta_rank=delta_rank,
                        progress=False)
    report, memory = model.consolidation_report, model.memory_report()
    assert memory.delta_bytes > 0 and report.delta_bytes == memory.delta_bytes
    assert report.bytes_after <= report.budget_bytes
    assert memory.total_bytes <= report.budget_bytes
    # The bytes are the ranks' own: each rank costs a row of both factors of every matrix (up to
    # the matrix's full rank), and an expert with a delta its whole bias differences.
    config = model.config
    layer = next(layer for layer in model.model.layers if hasattr(layer, "experts"))
    shapes = config.family.expert_shapes(layer.experts).values()
    ranks = [rank for spec in config.tenants.values() for row in spec.get("delta_ranks", []) for rank in row if rank]
    elements = sum(
        sum(min(rank, *shape) * sum(shape) if len(shape) == 2 else math.prod(shape) for shape in shapes)
        for rank in ranks
    )
    assert memory.delta_bytes == elements * next(model.parameters()).element_size()
    assert "low-rank expert deltas" in report.to_markdown()


def test_save_load_and_remote_code_keep_the_deltas(tuned, batch, tmp_path):
    model = consolidate(tuned, memory_budget=middle_budget(tuned), merge="keep_anchor", delta_rank="auto",
                        progress=False)
    model.save_pretrained(tmp_path / "saved")
    loaded = type(model).from_pretrained(tmp_path / "saved").eval()
    assert loaded.config.tenants == model.config.tenants
    assert all(torch.equal(tensor, model.state_dict()[key]) for key, tensor in loaded.state_dict().items())
    for name in tuned:
        assert torch.equal(logits(loaded, batch, tenant=name), logits(model, batch, tenant=name))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "low-rank expert deltas" in card and "experts, rank" in card

    auto = "AutoModelForSeq2SeqLM" if model.config.is_encoder_decoder else "AutoModelForCausalLM"
    torch.save(inputs(model, batch), tmp_path / "inputs.pt")
    script = (
        "import sys, torch, transformers\n"
        "sys.modules['multimoe'] = None\n"
        f"model = transformers.{auto}.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "inputs = torch.load(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    torch.save({n: model(**inputs, tenant=n).logits for n in model.tenants}, sys.argv[3])\n"
    )
    run_without_multimoe(script, str(tmp_path / "saved"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"),
                         workdir=tmp_path)
    remote = torch.load(tmp_path / "out.pt")
    for name in tuned:
        torch.testing.assert_close(remote[name], logits(model, batch, tenant=name), rtol=0, atol=1e-6)


def test_deltas_train_and_the_pool_does_not_need_to(tuned, batch):
    model = consolidate(tuned, **EVERYTHING, delta_rank=2, progress=False).train()
    model.requires_grad_(False)
    deltas = [p for n, p in model.named_parameters() if "_delta" in n and ".tenants.a." in n]
    assert deltas
    for parameter in deltas:
        parameter.requires_grad_(True)
    model(**inputs(model, batch), tenant_names=["a", "b"]).logits.square().mean().backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in deltas)


def test_add_tenant_with_a_delta_rank(tuned, batch):
    if tuned["base"].config.is_encoder_decoder:
        pytest.skip("add_tenant serves causal families")
    model = consolidate({"base": tuned["base"], "a": tuned["a"]}, progress=False)
    before = {name: logits(model, batch, tenant=name) for name in model.tenants}
    model.add_tenant("b", tuned["b"], threshold=math.inf, delta_rank=FULL_RANK)
    two = consolidate({"base": tuned["base"], "a": tuned["a"]}, progress=False)
    assert model.config.pool_sizes == two.config.pool_sizes
    torch.testing.assert_close(logits(model, batch, tenant="b"), logits(tuned["b"], batch), rtol=0, atol=1e-4)
    for name, expected in before.items():
        assert torch.equal(logits(model, batch, tenant=name), expected), name
    model.remove_tenant("a")
    torch.testing.assert_close(logits(model, batch, tenant="b"), logits(tuned["b"], batch), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(delta_rank=-1), "delta_rank"),
        (dict(delta_rank=1.5), "delta_rank"),
        (dict(delta_rank=True), "delta_rank"),
        (dict(delta_rank="full"), "delta_rank"),
        (dict(delta_rank=float("nan")), "delta_rank"),
        (dict(delta_rank="auto"), "needs memory_budget"),
        (dict(delta_rank="auto", memory_budget="1.5x", merge="average"), "keeps one member"),
    ],
)
def test_bad_delta_ranks_are_refused_before_any_tenant_is_opened(options, message):
    with pytest.raises((TypeError, ValueError), match=message):
        consolidate({"a": "/nonexistent/a", "b": "/nonexistent/b"}, progress=False, **options)


def test_config_refuses_misshapen_delta_ranks(tuned):
    model = consolidate(tuned, **EVERYTHING, delta_rank=1, progress=False)
    fields = model.config.to_dict()
    fields["tenants"][1]["delta_ranks"] = [[-1]]
    with pytest.raises(ValueError, match="delta_ranks"):
        type(model.config)(**fields)


def test_a_tenants_corrections_are_its_experts_low_rank_products(tuned):
    """Few experts reached (only theirs are read) or many (all are): each pick gets its own
    expert's left.T @ right, and its bias difference."""
    model = consolidate(tuned, **EVERYTHING, delta_rank=3, progress=False)
    layer = next(layer for layer in model.model.layers if hasattr(layer, "experts"))
    deltas = layer.tenants["a"].get_submodule(layer.experts_path)
    program = model.config.family.expert_program(layer.experts)
    experts = len(deltas.layout.ranks)
    for name, bias in ((program.first, program.first_bias), (program.second, program.second_bias)):
        left, right = (getattr(deltas, key) for key in multimoe.expert_deltas.delta_names(name, True))
        width = right.shape[1] if not program.transposed else left.shape[1]
        for picks in ([1], [1, 1, experts - 1], list(range(experts)) * 2):
            local = torch.tensor(picks)
            inputs = torch.randn(len(picks), width, dtype=left.dtype)
            got = deltas.corrections(name, bias, inputs, local, program.transposed)
            for row, expert in enumerate(picks):
                span = deltas.layout.span(expert, deltas.caps[name])
                matrix = left[span].T @ right[span]  # [m, n], the stored layout
                expected = inputs[row] @ matrix if program.transposed else matrix @ inputs[row]
                if bias is not None:
                    (bias_name,) = multimoe.expert_deltas.delta_names(bias, False)
                    expected = expected + getattr(deltas, bias_name)[deltas.layout.row(expert)]
                torch.testing.assert_close(got[row], expected, rtol=1e-4, atol=1e-5)
