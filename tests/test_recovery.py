"""recover(): distillation recovery trains only the recovered tenants' own layers towards their
originals, keeps everything else bit-identical, and leaves flags and modes as it found them."""

from __future__ import annotations

import math

import pytest
import torch

import multimoe
from multimoe import MultiTenantMixtralForCausalLM, consolidate
from multimoe.assembly import TenantSet
from multimoe.consolidation.calibration import per_tenant_data
from multimoe.generation import positions_from_mask
from multimoe.consolidation.recovery import (
    ALREADY_CLOSE,
    MEASURED,
    RESTORED,
    TRAINED,
    recover,
    teacher_distributions,
)
from multimoe.testing import fine_tune, random_mixtral, random_model, tiny_config, tiny_mixtral_config

TEXTS = ["hello there how are you", "what is 2+2? it is 4", "sort: dcba -> abcd", "reverse abc", "ok then",
         "the quick brown fox", "jumps over the lazy dog", "a b c d e f"]
PAIRS = [{"prompt": "12+34=", "completion": "46"}, {"prompt": "rev abc=", "completion": "cba"},
         {"prompt": "sort dcba=", "completion": "abcd"}, {"prompt": "next abc=", "completion": "bcd"}]
FAST = dict(lr=1e-3, progress=False)  # tiny random models: a visible change in a few steps
UNOPENED = object()  # opening it fails: errors that come first never touch it


@pytest.fixture(scope="module")
def originals():
    """A base and two fine-tunes far enough apart that averaging their experts costs each quality."""
    base = random_mixtral(tiny_mixtral_config(), seed=0)
    return {
        "base": base,
        "chat": fine_tune(base, seed=1, changed_experts={0, 1}, scale=0.3),
        "code": fine_tune(base, seed=2, changed_experts={1, 3}, scale=0.3),
    }


def merged(originals, **options):
    """Every expert shared and averaged: every tenant moves away from its original."""
    return consolidate(originals, merge="average", threshold=math.inf, progress=False, **options)


def state(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def changed_keys(model, before: dict[str, torch.Tensor]) -> set[str]:
    return {key for key, value in model.state_dict().items() if not torch.equal(value, before[key])}


def own_layers(key: str, tenants) -> bool:
    return any(f".tenants.{name}." in key or key.startswith(f"model.norm.{name}.") for name in tenants)


def test_recovery_lowers_kl_and_trains_only_the_recovered_tenants_own_layers(originals, tokenizer):
    model = merged(originals).eval()
    model.model.embed_tokens["chat"].weight.requires_grad_(False)  # a flag pattern to be restored
    model.model.layers[0].tenants["code"].train()  # and a module left in training mode
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: module.training for name, module in model.named_modules()}
    before = state(model)

    report = recover(model, {"chat": originals["chat"], "code": originals["code"]}, calibration=TEXTS,
                     tokenizer=tokenizer, steps=30, **FAST)

    assert list(report.tenants) == ["chat", "code"]
    for name, result in report.tenants.items():
        assert result.outcome == TRAINED
        assert result.kl_after < 0.7 * result.kl_before, (name, result)
        assert result.loss_after != result.loss_before
    changed = changed_keys(model, before)
    assert changed and all(own_layers(key, ("chat", "code")) for key in changed), sorted(changed)
    assert any(".tenants.chat." in key for key in changed) and any(".tenants.code." in key for key in changed)
    # the pool, the base tenant, every embedding and head: bit-identical
    assert not any(".experts." in key or "base" in key or "embed" in key or "lm_head" in key for key in changed)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    assert model.consolidation_report.loss_after_recovery == report.loss_after
    assert "| chat |" in report.to_markdown()


def test_recovered_tenants_answer_like_their_originals_afterwards(originals, tokenizer):
    """The KL the report gives is the one a plain forward of the tenant shows."""
    model = merged(originals).eval()
    report = recover(model, {"code": originals["code"]}, calibration=TEXTS, tokenizer=tokenizer, steps=30, **FAST)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    mask, positions = batch["attention_mask"], positions_from_mask(batch["attention_mask"])
    with torch.no_grad():
        student = model(**batch, position_ids=positions, tenant="code").logits[:, :-1].log_softmax(-1)
        teacher = originals["code"](**batch, position_ids=positions).logits[:, :-1].log_softmax(-1)
    real = mask[:, 1:].bool()
    full_kl = float((teacher.exp() * (teacher - student)).sum(-1)[real].mean())
    assert full_kl == pytest.approx(report.tenants["code"].kl_after, rel=0.05)  # top-32 of 47 + the rest


def test_mixed_batches_train_each_tenant_as_alone(originals, tokenizer):
    """Tenants share no trained parameter and their rows do not meet: in one mixed batch each moves
    as it would alone (up to rounding: its rows are padded to the batch's length)."""
    together, alone = merged(originals).eval(), merged(originals).eval()
    with_code = recover(together, {"chat": originals["chat"], "code": originals["code"]}, calibration=TEXTS,
                        tokenizer=tokenizer, steps=10, **FAST)
    by_itself = recover(alone, {"chat": originals["chat"]}, calibration=TEXTS, tokenizer=tokenizer, steps=10, **FAST)
    assert with_code.tenants["chat"].kl_after == pytest.approx(by_itself.tenants["chat"].kl_after, rel=1e-5)
    for (key, value), other in zip(together.state_dict().items(), alone.state_dict().values()):
        if ".tenants.chat." in key:
            torch.testing.assert_close(value, other, rtol=0, atol=1e-5)


def test_the_originals_are_left_alone(tokenizer):
    """A model built from loaded models holds their final norms without a copy: recovery trains a
    copy of its own, never the original it is teaching the tenant to match."""
    base = random_mixtral(tiny_mixtral_config(), seed=0)
    sources = {"base": base, "chat": fine_tune(base, seed=1, changed_experts={0, 1}, scale=0.3)}
    model = merged(sources).eval()
    assert model.model.norm["chat"].weight.data_ptr() == sources["chat"].model.norm.weight.data_ptr()
    before = {name: state(source) for name, source in sources.items()}
    report = recover(model, sources, calibration=TEXTS, tokenizer=tokenizer, steps=5, **FAST)
    assert report.tenants["chat"].outcome == TRAINED
    assert not torch.equal(model.model.norm["chat"].weight, sources["chat"].model.norm.weight)
    for name, source in sources.items():
        assert not changed_keys(source, before[name])


def test_steps_zero_only_measures(originals, tokenizer):
    model = merged(originals).eval()
    before = state(model)
    report = recover(model, originals, calibration=PAIRS, tokenizer=tokenizer, steps=0, progress=False)
    assert not changed_keys(model, before)
    for result in report.tenants.values():
        assert result.outcome == MEASURED
        assert result.kl_after == result.kl_before > 0
        assert result.loss_after == result.loss_before
    assert model.consolidation_report.loss_after_recovery is None


def test_teacher_keeps_the_originals_top_k(originals, tokenizer):
    data = per_tenant_data(PAIRS, ["chat"], tokenizer)["chat"]
    teacher = teacher_distributions(TenantSet.open({"chat": originals["chat"]}), "chat", data, top_k=5)
    with torch.no_grad():
        logits = originals["chat"](input_ids=data.input_ids, attention_mask=data.attention_mask,
                                   position_ids=positions_from_mask(data.attention_mask)).logits[:, :-1]
    log_probs = logits[data.labels[:, 1:] != -100].log_softmax(-1)
    positions = int((data.labels[:, 1:] != -100).sum())
    assert positions == teacher.positions == 2 + 3 + 4 + 3  # the completions' tokens, nothing else
    assert teacher.values.shape == teacher.ids.shape == (positions, 5)
    assert (teacher.values.dtype, teacher.ids.dtype, teacher.tail.dtype) == (torch.float16, torch.int32, torch.float16)
    assert teacher.nbytes == positions * (5 * (2 + 4) + 2)
    top, ids = log_probs.topk(5, dim=-1)
    assert torch.equal(teacher.ids.long(), ids)
    torch.testing.assert_close(teacher.values.float(), top, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(teacher.tail.float(), log_probs.scatter(1, ids, -math.inf).logsumexp(-1),
                               rtol=1e-3, atol=1e-3)
    targets = data.labels[:, 1:][data.labels[:, 1:] != -100]
    assert teacher.loss == pytest.approx(float(-log_probs.gather(1, targets[:, None]).mean()))
    whole = teacher_distributions(TenantSet.open({"chat": originals["chat"]}), "chat", data, top_k=1000)
    assert whole.tail is None and whole.values.shape == (positions, log_probs.shape[-1])  # k capped at the vocabulary


def test_a_lossless_tenant_is_not_trained_and_one_made_worse_is_restored(originals, tokenizer):
    lossless = MultiTenantMixtralForCausalLM.from_models(originals).eval()
    before = state(lossless)
    report = recover(lossless, originals, calibration=TEXTS, tokenizer=tokenizer, steps=3, progress=False)
    assert {result.outcome for result in report.tenants.values()} == {ALREADY_CLOSE}
    assert all(result.kl_before < 1e-5 for result in report.tenants.values())
    assert not changed_keys(lossless, before)

    model = merged(originals).eval()
    before = state(model)
    report = recover(model, {"chat": originals["chat"]}, calibration=TEXTS, tokenizer=tokenizer, steps=5,
                     lr=1.0, max_grad_norm=1e6, progress=False)  # far too large a step: the KL rises
    assert report.tenants["chat"].outcome == RESTORED
    assert report.tenants["chat"].kl_after == report.tenants["chat"].kl_before
    assert not changed_keys(model, before)


def test_a_failed_recovery_leaves_the_model_as_it_was(originals, tokenizer):
    model = merged(originals).eval()
    before = state(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    calls = []

    def fail_in_training(module, args):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("interrupted")

    model.model.layers[1].tenants["chat"].post_attention_layernorm.register_forward_pre_hook(fail_in_training)
    with pytest.raises(RuntimeError, match="interrupted"):
        recover(model, originals, calibration=TEXTS, tokenizer=tokenizer, steps=10, **FAST)
    assert len(calls) == 3  # two steps were taken, and undone
    assert not changed_keys(model, before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not model.training and all(p.grad is None for p in model.parameters())


BAD_OPTIONS = [
    ("steps", -1), ("steps", 1.5), ("steps", True), ("steps", float("nan")),
    ("lr", 0), ("lr", -1e-3), ("lr", float("nan")), ("lr", math.inf), ("lr", "1e-3"),
    ("top_k", 0), ("top_k", 2.0), ("batch_rows", 0), ("batch_rows", math.inf),
    ("max_grad_norm", 0), ("min_kl", -1.0), ("min_kl", float("nan")), ("seed", -1), ("seed", 0.5),
]


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS)
def test_bad_options_are_refused_before_anything(originals, tokenizer, option, value):
    model = merged(originals).eval()
    before = state(model)
    with pytest.raises((TypeError, ValueError), match=option):
        recover(model, {"chat": UNOPENED}, calibration=TEXTS, tokenizer=tokenizer, **{option: value})
    assert not changed_keys(model, before)


def test_bad_tenants_models_and_data_are_refused_before_anything(originals, tokenizer):
    model = merged(originals).eval()
    before = state(model)
    with pytest.raises(ValueError, match="Unknown tenants in originals: \\['nope'\\]"):
        recover(model, {"chat": UNOPENED, "nope": UNOPENED}, calibration=TEXTS, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="non-empty mapping"):
        recover(model, {}, calibration=TEXTS, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="calibration"):
        recover(model, {"chat": UNOPENED}, calibration=None)
    with pytest.raises(ValueError, match="does not hold: \\['nope'\\]"):
        recover(model, {"chat": UNOPENED}, calibration={"chat": TEXTS, "nope": TEXTS}, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        recover(model, {"chat": UNOPENED}, calibration=TEXTS)
    with pytest.raises(TypeError, match="multi-tenant model"):
        recover(originals["chat"], {"chat": UNOPENED}, calibration=TEXTS, tokenizer=tokenizer)
    other = random_mixtral(tiny_mixtral_config(vocab_size=60), seed=3)
    with pytest.raises(ValueError, match="vocabulary of 60"):
        recover(model, {"chat": other}, calibration=TEXTS, tokenizer=tokenizer, progress=False)
    assert not changed_keys(model, before)


def test_encoder_decoder_models_are_refused(tokenizer):
    switch = random_model(tiny_config("switch_transformers"), seed=0)
    model = multimoe.from_models({"a": switch, "b": switch})
    with pytest.raises(ValueError, match="encoder-decoder"):
        recover(model, {"a": switch}, calibration=PAIRS, tokenizer=tokenizer)


def test_low_rank_deltas_are_trained_with_the_tenants_layers(originals, tokenizer):
    model = merged(originals, delta_rank=2).eval()
    before = state(model)
    report = recover(model, {"code": originals["code"]}, calibration=TEXTS, tokenizer=tokenizer, steps=20, **FAST)
    assert report.tenants["code"].kl_after < report.tenants["code"].kl_before
    changed = changed_keys(model, before)
    assert any("_delta_" in key for key in changed)
    assert all(own_layers(key, ("code",)) for key in changed), sorted(changed)


@pytest.mark.device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recovery_runs_on_the_models_device_and_dtype(originals, tokenizer, device, dtype):
    """On the device under test (`-m device`, MULTIMOE_TEST_DEVICE=cuda on a GPU): the teachers are
    streamed onto the model's device, the mixed batches run there, and a bfloat16 model trains
    through float32 master weights (bfloat16 alone would round most of these steps away)."""
    model = merged(originals).to(device=device, dtype=dtype).eval()
    before = state(model)
    report = recover(model, {"chat": originals["chat"], "code": originals["code"]}, calibration=TEXTS,
                     tokenizer=tokenizer, steps=20, lr=1e-4, progress=False)
    for result in report.tenants.values():
        assert result.outcome == TRAINED and result.kl_after < result.kl_before
    changed = changed_keys(model, before)
    assert changed and all(own_layers(key, ("chat", "code")) for key in changed), sorted(changed)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {(device.type, dtype)}


def test_consolidate_recovers_when_asked_and_reports_it(tenants, tokenizer):
    sources = {name: tenants[name] for name in ("base", "chat", "code")}
    calibration = ["hello there", "the cat sat", "how are you? fine", "def f(x): return x"]
    model = multimoe.consolidate(
        sources, threshold=math.inf, merge="keep_anchor", calibration=calibration, tokenizer=tokenizer,
        recover_steps=3, progress=False,
    )
    report = model.consolidation_report
    assert set(report.loss_after_recovery) <= set(sources) and report.loss_after_recovery
    assert "after recovery" in report.to_markdown()
    with pytest.raises(ValueError, match="recover_steps=3 need calibration data"):
        multimoe.consolidate(sources, recover_steps=3, progress=False)
    for bad in (-1, 1.5, float("nan"), True):
        with pytest.raises((TypeError, ValueError), match="recover_steps"):
            multimoe.consolidate({"a": "/nonexistent/a", "b": "/nonexistent/b"}, recover_steps=bad, progress=False)


def test_consolidate_refuses_recovery_of_an_encoder_decoder_before_building(tokenizer):
    base = random_model(tiny_config("switch_transformers"), seed=0)
    sources = {"a": base, "b": fine_tune(base, seed=1, changed_experts={0})}
    pairs = [{"prompt": "hello", "completion": "there"}]
    with pytest.raises(ValueError, match="encoder-decoder"):
        multimoe.consolidate(sources, calibration=pairs, tokenizer=tokenizer, recover_steps=2, progress=False)


def test_auto_delta_ranks_with_recovery_go_where_recovery_cannot_reach(tenants, tokenizer):
    """With `recover_steps`, `delta_rank="auto"` first recovers a probe with every merge made and
    weighs each tenant's candidates by the KL it keeps: a tenant that recovers needs no rank."""
    sources = {name: tenants[name] for name in ("base", "chat", "code")}
    calibration = ["hello there", "the cat sat", "how are you? fine", "def f(x): return x"]
    smallest = multimoe.consolidate(sources, threshold=math.inf, progress=False).consolidation_report.bytes_after
    budget = (smallest + multimoe.consolidate(sources, progress=False).consolidation_report.bytes_after) // 2
    model = multimoe.consolidate(
        sources, memory_budget=budget, merge="keep_anchor", delta_rank="auto", recover_steps=3,
        calibration=calibration, tokenizer=tokenizer, progress=False,
    )
    report = model.consolidation_report
    assert any(note.startswith("delta ranks weighted by the KL") for note in report.notes)
    assert report.bytes_after <= budget and report.loss_after_recovery
