"""Switch Transformers tenants: an encoder-decoder with per-expert modules, top-1 routing with
expert capacity, relative position bias and a tied, rescaled lm_head, served losslessly against
`SwitchTransformersForConditionalGeneration`.

Each tenant's logits are compared bit for bit with its original's: the multi-tenant model runs the
family's own modules on the same rows, so the kernels and layouts are the same. A mixed batch runs
each tenant group's rows through that tenant's modules in a smaller batch, whose kernels may round
differently: there rows are compared within 1e-5, and greedy or beam generations token for token.
"""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import HfApi
from transformers import AutoModelForSeq2SeqLM, SwitchTransformersForConditionalGeneration

import multimoe
from multimoe import consolidate
from multimoe.testing import character_tokenizer, fine_tune, random_model, run_without_multimoe, tiny_config

TEXTS = ["sort dcba", "hi", "what is 2+2?", "rev abc"]
ROWS = ["base", "untied", "a", "base"]
PAIRS = [{"prompt": "sort dcba", "completion": "abcd"}, {"prompt": "2+2", "completion": "4"},
         {"prompt": "rev abc", "completion": "cba"}]


@pytest.fixture(scope="module")
def tokenizer():
    return character_tokenizer()


@pytest.fixture(scope="module")
def originals() -> dict[str, SwitchTransformersForConditionalGeneration]:
    """A tied base, a fine-tune moving experts {0, 1}, and a tenant with untied embeddings and head."""
    base = random_model(tiny_config("switch_transformers"), seed=0)
    untied = random_model(tiny_config("switch_transformers", tie_word_embeddings=False), seed=1)
    return {"base": base, "a": fine_tune(base, seed=2, changed_experts={0, 1}), "untied": untied}


@pytest.fixture(scope="module")
def multi(originals):
    return multimoe.from_models(originals).eval()


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


def decoder_inputs(batch) -> torch.Tensor:
    return torch.roll(batch["input_ids"], 1, dims=1)[:, :5].contiguous()


def test_the_class_and_its_layout(multi, originals):
    assert type(multi).__name__ == "MultiTenantSwitchTransformersForConditionalGeneration"
    assert multi.config.pool_sizes == [0, 10, 0, 10]  # base 4, `a` 2 more (it shares 2, 3), untied 4
    assert {name: spec["tie_word_embeddings"] for name, spec in multi.config.tenants.items()} == {
        "base": True, "a": True, "untied": False
    }
    names = dict(multi.named_parameters())
    assert "model.encoder.block.1.experts.expert_5.wi.weight" in names
    assert "model.decoder.block.0.tenants.a.layer.0.SelfAttention.relative_attention_bias.weight" in names
    assert multi.model.encoder.embed_tokens["a"].weight is multi.model.shared["a"].weight
    assert multi.model.encoder.embed_tokens["untied"].weight is not multi.model.shared["untied"].weight


def test_every_tenants_logits_equal_its_originals(multi, originals, batch):
    inputs = dict(batch, decoder_input_ids=decoder_inputs(batch))
    with torch.no_grad():
        for name, original in originals.items():
            assert torch.equal(multi(**inputs, tenant=name).logits, original(**inputs).logits), name
            with multi.active(name):
                assert torch.equal(multi(**inputs).logits, original(**inputs).logits), name


def test_expert_capacity_drops_the_same_tokens(originals, batch):
    """With a capacity of one token per expert and sequence most tokens overflow; the multi-tenant
    model must drop exactly the tokens the original drops."""
    config = tiny_config("switch_transformers", expert_capacity=1)
    tight = {name: random_model(config, seed=seed) for seed, name in enumerate(("x", "y"))}
    model = multimoe.from_models(tight).eval()
    inputs = dict(batch, decoder_input_ids=decoder_inputs(batch))
    router = tight["x"].encoder.block[1].layer[1].mlp.router
    with torch.no_grad():
        dispatch, _, _ = router(torch.randn(4, 12, config.d_model))
        assert int(dispatch.sum()) < 4 * 12  # tokens are dropped
        for name, original in tight.items():
            assert torch.equal(model(**inputs, tenant=name).logits, original(**inputs).logits), name
        mixed = model(**inputs, tenant_names=["x", "y", "y", "x"]).logits
        for row, name in enumerate(["x", "y", "y", "x"]):
            torch.testing.assert_close(mixed[row], tight[name](**inputs).logits[row], rtol=0, atol=1e-5)


def test_bfloat16_tenants_keep_the_routers_float32(originals, batch):
    sources = {name: SwitchTransformersForConditionalGeneration(model.config).to(torch.bfloat16).eval()
               for name, model in originals.items() if name != "untied"}
    for source, original in zip(sources.values(), (originals["base"], originals["a"])):
        source.load_state_dict(original.state_dict())
    model = multimoe.from_models(sources).eval()
    assert model.dtype == torch.bfloat16
    inputs = dict(batch, decoder_input_ids=decoder_inputs(batch))
    with torch.no_grad():
        for name, source in sources.items():
            assert torch.equal(model(**inputs, tenant=name).logits, source(**inputs).logits), name


def test_mixed_batch_rows_match_their_originals(multi, originals, batch):
    inputs = dict(batch, decoder_input_ids=decoder_inputs(batch))
    with torch.no_grad():
        mixed = multi(**inputs, tenant_names=ROWS).logits
        for row, name in enumerate(ROWS):
            torch.testing.assert_close(mixed[row], originals[name](**inputs).logits[row], rtol=0, atol=1e-5)


@pytest.mark.parametrize("settings", [dict(), dict(num_beams=3)], ids=["greedy", "beams"])
def test_generations_equal_the_originals_alone_and_mixed(multi, originals, tokenizer, batch, settings):
    settings = dict(max_new_tokens=6, do_sample=False, **settings)
    for name, original in originals.items():
        assert torch.equal(multi.generate(**batch, tenant=name, **settings), original.generate(**batch, **settings))
    mixed = multi.generate(**batch, tenant_names=ROWS, **settings)
    for row, (text, name) in enumerate(zip(TEXTS, ROWS)):
        alone = originals[name].generate(**tokenizer(text, return_tensors="pt"), **settings)[0]
        assert mixed[row, : len(alone)].tolist() == alone.tolist(), (row, name)


def test_save_and_load_through_auto_model_for_seq2seq_lm(multi, originals, batch, tmp_path):
    multi.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(multi) and loaded.tenants == multi.tenants
    assert multimoe.MultiTenantForCausalLM.from_pretrained(tmp_path).tenants == multi.tenants  # by model type
    for (key, mine), (_, theirs) in zip(multi.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(mine, theirs), key
    with torch.no_grad():
        for name, original in originals.items():
            settings = dict(max_new_tokens=5, do_sample=False)
            assert torch.equal(loaded.generate(**batch, tenant=name, **settings), original.generate(**batch, **settings))


REMOTE_CODE = r"""
import sys
sys.modules["multimoe"] = None  # multimoe is not installed, as far as this process can tell
import torch
from huggingface_hub import HfApi
from transformers import AutoModelForSeq2SeqLM
directory, inputs_path, out_path = sys.argv[1:]
model = AutoModelForSeq2SeqLM.from_pretrained(directory, trust_remote_code=True).eval()
inputs = torch.load(inputs_path)
with torch.no_grad():
    out = {name: model.generate(**inputs, tenant=name, max_new_tokens=5, do_sample=False) for name in model.tenants}
torch.save({"class": type(model).__name__, "generations": out}, out_path)
"""


def test_loads_with_trust_remote_code_where_multimoe_is_not_installed(multi, originals, batch, tmp_path):
    multi.save_pretrained(tmp_path / "saved")
    torch.save(dict(batch), tmp_path / "inputs.pt")
    run_without_multimoe(REMOTE_CODE, str(tmp_path / "saved"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"),
                         workdir=tmp_path)
    remote = torch.load(tmp_path / "out.pt")
    assert remote["class"] == "MultiTenantSwitchTransformersForConditionalGeneration"
    for name, original in originals.items():
        assert torch.equal(remote["generations"][name], original.generate(**batch, max_new_tokens=5, do_sample=False))


def test_consolidate_lossless_then_within_a_budget_with_output_similarity(originals, tokenizer, batch):
    sources = {name: originals[name] for name in ("base", "a")}
    lossless = consolidate(sources, progress=False)
    assert lossless.config.pool_sizes == multimoe.from_models(sources).config.pool_sizes
    report = lossless.consolidation_report
    shared = consolidate(sources, memory_budget=report.bytes_after - 1, similarity="output", merge="keep_anchor",
                         calibration=PAIRS, tokenizer=tokenizer, progress=False)
    assert type(shared).__name__ == "MultiTenantSwitchTransformersForConditionalGeneration"
    assert sum(shared.config.pool_sizes) < sum(lossless.config.pool_sizes)
    assert shared.consolidation_report.deciding_limit == "memory_budget"
    out = shared.generate(**batch, tenant_names=["base", "a", "a", "base"], max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 4


def test_calibration_of_an_encoder_decoder_takes_pairs(originals, tokenizer):
    with pytest.raises(ValueError, match="encoder-decoder model is calibrated on"):
        consolidate({n: originals[n] for n in ("base", "a")}, similarity="output", memory_budget="2.0x",
                    calibration=["plain text"], tokenizer=tokenizer, progress=False)


def test_unknown_tenants_and_one_name_per_row_are_refused(multi, batch):
    with pytest.raises(multimoe.UnknownTenantError, match="nope"):
        multi.generate(**batch, tenant="nope", max_new_tokens=2)
    with pytest.raises(ValueError, match="Give one tenant per row"):
        multi(**batch, decoder_input_ids=decoder_inputs(batch), tenant_ids=torch.tensor([0, 1]))


def test_add_tenant_then_remove_it_leaves_the_others_bit_identical(originals, batch):
    model = multimoe.from_models({name: originals[name] for name in ("base", "untied")}).eval()
    inputs = dict(batch, decoder_input_ids=decoder_inputs(batch))
    with torch.no_grad():
        before = {name: model(**inputs, tenant=name).logits for name in model.tenants}
        model.add_tenant("a", originals["a"])
        assert model.config.pool_sizes == [0, 10, 0, 10]  # `a` brings only the experts it moved
        assert model.model.encoder.embed_tokens["a"].weight is model.model.shared["a"].weight
        assert torch.equal(model(**inputs, tenant="a").logits, originals["a"](**inputs).logits)
        model.remove_tenant("base")
        assert model.config.pool_sizes == [0, 8, 0, 8]  # untied's 4, `a`'s 2 and the 2 of base's it reads
        assert torch.equal(model(**inputs, tenant="untied").logits, before["untied"])
        assert torch.equal(model(**inputs, tenant="a").logits, originals["a"](**inputs).logits)


def test_loss_with_router_losses_and_recorded_outputs_equal_the_originals(multi, originals, batch):
    labels = decoder_inputs(batch)
    for name, original in originals.items():
        mine = multi(**batch, labels=labels, tenant=name, output_router_logits=True, output_hidden_states=True)
        theirs = original(**batch, labels=labels, output_router_logits=True, output_hidden_states=True)
        assert torch.equal(mine.loss, theirs.loss) and torch.equal(mine.encoder_aux_loss, theirs.encoder_aux_loss), name
        for kind in ("encoder_hidden_states", "decoder_hidden_states", "encoder_router_logits"):
            assert all(torch.equal(x, y) for x, y in zip(getattr(mine, kind), getattr(theirs, kind), strict=True)), kind


def test_push_to_hub_uploads_remote_code_and_the_checkpoint_loads_back(multi, originals, batch, tokenizer,
                                                                       monkeypatch, tmp_path):
    commits = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: type("Url", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kwargs: commits.append(
        {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}))
    multi.push_to_hub("acme/switch-tenants", tokenizer=tokenizer)
    (files,) = commits
    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling.MultiTenantSwitchTransformersForConditionalGeneration"
    assert {"modeling.py", "modeling_seq2seq.py", "families.py", "tokenizer.json"} <= set(files)
    for path, content in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(content)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    for name, original in originals.items():
        settings = dict(max_new_tokens=4, do_sample=False)
        assert torch.equal(loaded.generate(**batch, tenant=name, **settings), original.generate(**batch, **settings))


def test_a_budget_counts_a_tied_tenants_embedding_once(originals):
    """Switch's encoder and decoder embeddings and lm_head all read a tied tenant's `shared`: the
    budget must count it once, as the model stores it, or it leaves memory unused."""
    sources = {name: originals[name] for name in ("base", "a")}
    model = consolidate(sources, memory_budget="1.75x", progress=False)
    report, one_model = model.memory_report(), model.memory_report().source_models_bytes / 2
    assert model.consolidation_report.bytes_after == report.total_bytes <= 1.75 * one_model


def test_the_model_card_names_the_family_and_its_auto_class(multi):
    from multimoe.hub import model_card

    card = model_card(multi)
    assert "switch_transformers" in card.split("---")[1] and "mixtral" not in card
    assert "AutoModelForSeq2SeqLM.from_pretrained(REPO, trust_remote_code=True)" in card


def test_expert_outputs_run_the_experts_without_dropout(originals):
    config = originals["base"].config
    family = multimoe.FAMILIES["switch_transformers"]
    assert config.dropout_rate > 0
    experts = family.read_experts(config, 1, originals["base"].state_dict().__getitem__)
    inputs = torch.randn(5, config.d_model)
    first, second = family.expert_outputs(config, experts, inputs), family.expert_outputs(config, experts, inputs)
    assert torch.equal(first, second)
    expert = originals["base"].encoder.block[1].layer[1].mlp.experts["expert_2"]
    torch.testing.assert_close(first[2], expert(inputs), rtol=0, atol=1e-6)


def test_a_bfloat16_mixed_batch_runs_each_tenants_float32_router(originals, batch):
    sources = {name: SwitchTransformersForConditionalGeneration(originals[name].config).to(torch.bfloat16).eval()
               for name in ("base", "a")}
    for name, source in sources.items():
        source.load_state_dict(originals[name].state_dict())
    model = multimoe.from_models(sources).eval()
    inputs = dict(batch, decoder_input_ids=decoder_inputs(batch))
    rows = ["base", "a", "a", "base"]
    with torch.no_grad():
        mixed = model(**inputs, tenant_names=rows).logits  # before any one-tenant call converts a router
        for row, name in enumerate(rows):
            torch.testing.assert_close(mixed[row], sources[name](**inputs).logits[row], rtol=2e-2, atol=2e-2)


def test_set_input_embeddings_reaches_both_stacks(originals, batch):
    model = multimoe.from_models({name: originals[name] for name in ("base", "a")}).eval()
    inputs = dict(batch, decoder_input_ids=decoder_inputs(batch))
    replacement = torch.nn.Embedding.from_pretrained(torch.zeros_like(originals["a"].shared.weight), freeze=False)
    with torch.no_grad(), model.active("a"):
        before = model(**inputs).logits
        model.set_input_embeddings(replacement)
        assert model.get_input_embeddings() is replacement
        assert model.model.encoder.embed_tokens["a"] is model.model.decoder.embed_tokens["a"] is replacement
        assert not torch.equal(model(**inputs).logits, before)
    assert torch.equal(model(**inputs, tenant="base").logits, originals["base"](**inputs).logits)
