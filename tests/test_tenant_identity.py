"""Every call runs the tenant it names, with that tenant's own settings: order across save/load,
tied or untied heads as the source computes them, per-tenant generation configs and loss settings,
the KV cache tag through row edits, the dtype of the sources, and inputs that name no tenant."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DynamicCache, GenerationConfig

from multimoe import CacheTenantMismatchError, CheckpointError, IncompatibleTenantsError, MultiTenantMixtralForCausalLM
from multimoe.testing import fine_tune, random_mixtral, tiny_mixtral_config

GREEDY = dict(max_new_tokens=12, do_sample=False)
# Separately built models run their experts through grouped_mm over pools of other sizes, whose sums
# may round differently on some CPUs (in practice they are bit-identical); running another tenant,
# another head or another dtype moves logits by 1e-2 to 10.
TOLERANCE = 1e-5


def logits(model, batch, **tenant):
    with torch.no_grad():
        return model(**batch, **tenant).logits


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor, atol: float = TOLERANCE) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


# -- order -------------------------------------------------------------------------------------


def test_tenant_order_survives_save_and_load(tenants, batch, tmp_path):
    """config.json is written with sorted keys; a mapping of tenants would reload as [alpha, zeta]
    and tenant_ids=[0] would run the other tenant."""
    model = MultiTenantMixtralForCausalLM.from_models({"zeta": tenants["chat"], "alpha": tenants["base"]}).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.tenants == ["zeta", "alpha"]
    ids = torch.tensor([0, 0])
    assert_same_logits(logits(loaded, batch, tenant_ids=ids), logits(tenants["chat"], batch))


def test_a_checkpoint_of_the_earlier_release_loads_in_its_stored_order(tenants, batch, tmp_path):
    """An earlier release stored tenants as a mapping, no per-tenant generation configs, and each
    tenant's router as `tenants.<t>.router` (today the Mixtral block's `mlp.gate`)."""
    model = MultiTenantMixtralForCausalLM.from_models({"zeta": tenants["chat"], "alpha": tenants["base"]}).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tenants"] = {entry.pop("name"): entry for entry in config["tenants"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.rmtree(tmp_path / "tenants")
    weights = load_file(tmp_path / "model.safetensors")
    renamed = {key.replace(".mlp.gate.weight", ".router.weight"): tensor for key, tensor in weights.items()}
    assert sum(key.endswith(".router.weight") for key in renamed) == 4  # 2 layers x 2 tenants
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = MultiTenantMixtralForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.tenants == ["zeta", "alpha"]
    for name in loaded.tenants:
        assert torch.equal(loaded.model.layers[1].tenants[name].mlp.gate.weight, model.model.layers[1].tenants[name].mlp.gate.weight)
        assert_same_logits(logits(loaded, batch, tenant=name), logits(model, batch, tenant=name))
    root = GenerationConfig.from_pretrained(tmp_path)
    assert all(config.to_dict() == root.to_dict() for config in loaded.generation_configs.values())


# -- tied or untied lm_head ----------------------------------------------------------------------


@pytest.fixture
def untied_despite_config(tenants):
    """A tied-config model whose lm_head was replaced: it computes with its own head."""
    model = random_mixtral(tiny_mixtral_config(tie_word_embeddings=True), seed=5)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model


def test_an_in_memory_source_whose_head_is_not_its_embedding_keeps_its_head(untied_despite_config, batch):
    multi = MultiTenantMixtralForCausalLM.from_models({"a": untied_despite_config}).eval()
    assert not multi.config.tenants["a"]["tie_word_embeddings"]
    assert_same_logits(logits(multi, batch), logits(untied_despite_config, batch))


def test_a_directory_storing_its_own_head_under_a_tied_config_keeps_it(untied_despite_config, batch, tmp_path):
    untied_despite_config.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = untied_despite_config.lm_head.weight.detach().clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # transformers unties: different values
    multi = MultiTenantMixtralForCausalLM.from_models({"a": str(tmp_path)}).eval()
    assert_same_logits(logits(multi, batch), logits(reference, batch))


# -- per-tenant settings ---------------------------------------------------------------------------


@pytest.fixture
def own_eos(tenants, tokenizer):
    """`chat` with an EOS token it produces early for the second prompt, `base` as it is."""
    chat = fine_tune(tenants["base"], seed=1, changed_experts={0, 1})
    inputs = tokenizer(["hello there"], return_tensors="pt")
    produced = chat.generate(**inputs, **GREEDY, eos_token_id=None, pad_token_id=0)[0, inputs["input_ids"].shape[1]:]
    chat.generation_config.eos_token_id = int(produced[3])
    return {"chat": chat, "base": tenants["base"]}


def test_each_tenant_generates_with_its_own_generation_config(own_eos, tokenizer, tmp_path):
    inputs = tokenizer(["hello there"], return_tensors="pt")
    model = MultiTenantMixtralForCausalLM.from_models({"base": own_eos["base"], "chat": own_eos["chat"]}).eval()
    expected = own_eos["chat"].generate(**inputs, **GREEDY)
    assert expected.shape[1] < inputs["input_ids"].shape[1] + 12  # stopped at its own EOS
    assert torch.equal(model.generate(**inputs, **GREEDY, tenant="chat"), expected)
    model.save_pretrained(tmp_path)
    loaded = MultiTenantMixtralForCausalLM.from_pretrained(tmp_path).eval()
    assert (tmp_path / "tenants" / "chat" / "generation_config.json").is_file()
    assert loaded.generation_configs["chat"].eos_token_id == own_eos["chat"].generation_config.eos_token_id
    assert torch.equal(loaded.generate(**inputs, **GREEDY, tenant="chat"), expected)
    with loaded.active("chat"):
        assert loaded.generation_config.eos_token_id == own_eos["chat"].generation_config.eos_token_id


def test_in_a_mixed_batch_each_row_stops_at_its_own_tenants_eos(own_eos, tokenizer):
    inputs = tokenizer(["hello there", "hello there"], return_tensors="pt")
    model = MultiTenantMixtralForCausalLM.from_models({"base": own_eos["base"], "chat": own_eos["chat"]}).eval()
    out = model.generate(**inputs, **GREEDY, tenant_names=["chat", "base"])
    chat = own_eos["chat"].generate(**{key: rows[:1] for key, rows in inputs.items()}, **GREEDY)
    base = own_eos["base"].generate(**{key: rows[1:] for key, rows in inputs.items()}, **GREEDY)
    assert torch.equal(out[0, : chat.shape[1]], chat[0]) and (out[0, chat.shape[1]:] == 0).all()  # then padding
    assert torch.equal(out[1, : base.shape[1]], base[0])


def test_generation_settings_the_tenants_of_a_batch_disagree_on_must_be_given(own_eos, tokenizer):
    own_eos["base"] = fine_tune(own_eos["base"], seed=3, changed_experts=set())
    own_eos["base"].generation_config.repetition_penalty = 1.5
    model = MultiTenantMixtralForCausalLM.from_models(own_eos).eval()
    inputs = tokenizer(["hi", "hi"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"different generation settings \['repetition_penalty'\]"):
        model.generate(**inputs, max_new_tokens=3, tenant_names=["chat", "base"])
    model.generate(**inputs, max_new_tokens=3, tenant_names=["chat", "base"], repetition_penalty=1.0)
    for setting in (dict(num_beams=2), dict(min_new_tokens=2)):
        with pytest.raises(ValueError, match=rf"\['{next(iter(setting))}'\] cannot apply per row"):
            model.generate(**inputs, max_new_tokens=3, tenant_names=["chat", "base"], repetition_penalty=1.0, **setting)


def test_per_row_eos_pads_with_an_eos_token_when_no_pad_token_is_set(own_eos, tokenizer):
    for model in own_eos.values():
        model.generation_config.pad_token_id = None  # as in Mixtral's own generation config
    model = MultiTenantMixtralForCausalLM.from_models(own_eos).eval()
    inputs = tokenizer(["hello there", "hello there"], return_tensors="pt")
    chat = own_eos["chat"].generate(**{key: rows[:1] for key, rows in inputs.items()}, **GREEDY)
    for pad in ({}, {"pad_token_id": None}):  # None: what a tokenizer without a pad token passes on
        out = model.generate(**inputs, **GREEDY, **pad, tenant_names=["chat", "base"])
        assert torch.equal(out[0, : chat.shape[1]], chat[0])


def test_a_given_generation_config_leaves_the_rest_to_the_rows_tenant(own_eos, tokenizer):
    """transformers fills what a given config leaves unset from `model.generation_config`: that must
    be the called tenant's, not the active one's."""
    model = MultiTenantMixtralForCausalLM.from_models(own_eos).eval()
    inputs = tokenizer(["hello there"], return_tensors="pt")
    model.set_active_model("base")
    given = GenerationConfig(max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(**inputs, generation_config=given, tenant="chat"),
                       own_eos["chat"].generate(**inputs, **GREEDY))
    # Keyword arguments win over a given config, as in transformers: num_beams=1 needs no single EOS.
    rows = tokenizer(["hello there", "hello there"], return_tensors="pt")
    model.generate(**rows, generation_config=GenerationConfig(max_new_tokens=4, num_beams=2), num_beams=1,
                   tenant_names=["chat", "base"])


def test_tenant_generation_configs_are_refused_when_some_are_missing_or_broken(own_eos, tmp_path):
    model = MultiTenantMixtralForCausalLM.from_models(own_eos)
    model.save_pretrained(tmp_path)
    (tmp_path / "tenants" / "chat" / "generation_config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"Tenant 'chat': cannot read tenants/chat/generation_config.json"):
        MultiTenantMixtralForCausalLM.from_pretrained(tmp_path)
    given = GenerationConfig(eos_token_id=42)
    loaded = MultiTenantMixtralForCausalLM.from_pretrained(tmp_path, generation_config=given)
    assert {config.eos_token_id for config in loaded.generation_configs.values()} == {42}


def test_loss_settings_that_differ_are_refused_unless_given(tenants):
    chat = fine_tune(tenants["base"], seed=1, changed_experts={0})
    chat.config.router_aux_loss_coef = 0.5
    with pytest.raises(IncompatibleTenantsError, match=r"router_aux_loss_coef .*pass the value to use"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "chat": chat})
    model = MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "chat": chat}, router_aux_loss_coef=0.1)
    assert model.config.router_aux_loss_coef == model.router_aux_loss_coef == 0.1
    chat.config.output_router_logits = True
    with pytest.raises(IncompatibleTenantsError, match="output_router_logits"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "chat": chat}, router_aux_loss_coef=0.1)
    with pytest.raises(IncompatibleTenantsError, match="while the model applies {'router_aux_loss_coef': 0.001"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"]}).add_tenant("chat", chat)


@pytest.mark.parametrize(
    "settings, error, message",
    [
        (dict(router_aux_loss_coef=float("nan")), ValueError, "router_aux_loss_coef must be a finite number"),
        (dict(router_aux_loss_coef=-1.0), ValueError, "router_aux_loss_coef must be at least 0"),
        (dict(attention_dropout=2.0), ValueError, "attention_dropout is a probability"),
        (dict(output_router_logits=1), TypeError, "output_router_logits must be a bool"),
        (dict(router_aux_loss_coeff=0.1), TypeError, r"Unexpected keyword arguments \['router_aux_loss_coeff'\]"),
    ],
)
def test_given_settings_are_checked_before_any_source_is_opened(settings, error, message):
    with pytest.raises(error, match=message):
        MultiTenantMixtralForCausalLM.from_models({"a": object()}, **settings)


# -- dtype ------------------------------------------------------------------------------------------


def test_the_dtype_comes_from_the_source_tensors_not_their_config(tenants, batch, tmp_path):
    bf16 = fine_tune(tenants["base"], seed=1, changed_experts={0}).to(torch.bfloat16)
    bf16.config.dtype = torch.float32  # what a config may still say after `.to()`
    model = MultiTenantMixtralForCausalLM.from_models({"a": bf16}).eval()
    assert model.dtype == torch.bfloat16
    # The reference is the bf16 checkpoint as transformers loads it: `.to()` also cast the rotary
    # frequencies of the in-memory source, which a loaded model keeps in fp32.
    bf16.save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert_same_logits(logits(model, batch), logits(reference, batch), atol=2e-2)  # a few bf16 ulps


def test_tenants_in_different_dtypes_are_refused_unless_a_dtype_is_given(tenants, batch):
    bf16 = fine_tune(tenants["base"], seed=1, changed_experts={0}).to(torch.bfloat16)
    with pytest.raises(IncompatibleTenantsError, match=r"different dtypes .*pass dtype="):
        MultiTenantMixtralForCausalLM.from_models({"bf16": bf16, "fp32": tenants["chat"]})
    model = MultiTenantMixtralForCausalLM.from_models({"bf16": bf16, "fp32": tenants["chat"]}, dtype=torch.float32)
    assert_same_logits(logits(model, batch, tenant="fp32"), logits(tenants["chat"], batch))
    with pytest.raises(IncompatibleTenantsError, match="convert the source first"):
        model.add_tenant("another", fine_tune(tenants["base"], seed=2, changed_experts={0}).to(torch.bfloat16))


# -- the KV cache tag -------------------------------------------------------------------------------


def test_the_cache_tag_follows_reordered_rows(multi, tokenizer):
    inputs = tokenizer(["hello there", "hello there"], return_tensors="pt")
    cache = DynamicCache(config=multi.config)
    step = dict(input_ids=torch.tensor([[5], [5]]), attention_mask=torch.ones(2, inputs["input_ids"].shape[1] + 1))
    with torch.no_grad():
        multi(**inputs, cache=cache, use_cache=True, tenant_names=["chat", "base"])
        cache.reorder_cache(torch.tensor([1, 0]))
        with pytest.raises(CacheTenantMismatchError):
            multi(**step, cache=cache, tenant_names=["chat", "base"])
        multi(**step, cache=cache, tenant_names=["base", "chat"])
        cache.batch_select_indices(torch.tensor([False, True]))  # a mask, as tensor indexing takes it
        cache.batch_repeat_interleave(2)
        assert pickle.loads(pickle.dumps(cache)).multimoe_row_tenants == ("chat", "chat")
        with pytest.raises(CacheTenantMismatchError):
            multi(input_ids=step["input_ids"], cache=cache, tenant="base")
        multi(input_ids=step["input_ids"], cache=cache, tenant="chat")


# -- inputs that name no tenant ----------------------------------------------------------------------


def test_input_embeddings_follow_the_scoped_tenant(multi, batch):
    with multi.active("code"):
        assert multi.get_input_embeddings() is multi.model.embed_tokens["code"]
        embeds = multi.get_input_embeddings()(batch["input_ids"])
        assert torch.equal(logits(multi, {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}),
                           logits(multi, batch))


def test_none_names_no_tenant(multi):
    active = multi.active_model
    with multi.active("code"):
        with pytest.raises(ValueError, match="Name a tenant: got None"):
            multi.set_active_model(None)
    with pytest.raises(ValueError, match="Name a tenant: got None"):
        multi.remove_tenant(None)
    assert multi.active_model == active and "code" in multi.tenants


@pytest.mark.parametrize(
    "routing, message",
    [
        (dict(tenant_names=[]), "tenant_names is empty"),
        (dict(tenant_ids=[0, 1]), "tenant_ids must be an integer tensor"),
        (dict(tenant_ids=torch.tensor([0.0, 1.0])), "tenant_ids must be an integer tensor"),
        (dict(tenant_names="chat"), "one name per row"),
        (dict(tenant_names=["chat", None]), "Name a tenant: got None"),
    ],
)
def test_bad_row_tenants_get_a_clear_error(multi, batch, routing, message):
    with pytest.raises(ValueError, match=message):
        multi(**batch, **routing)


def test_a_batch_without_rows_gets_a_clear_error(multi):
    with pytest.raises(ValueError, match="no rows"):
        multi(input_ids=torch.zeros(0, 3, dtype=torch.long), tenant_names=[])


@pytest.mark.parametrize("threshold", [float("nan"), -1.0, -float("inf"), "0.1", True])
def test_add_tenant_refuses_a_threshold_that_is_not_a_distance(tenants, threshold):
    model = MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"]})
    with pytest.raises((ValueError, TypeError), match="threshold"):
        model.add_tenant("chat", tenants["chat"], threshold=threshold)
    assert model.tenants == ["base"]


# -- resizing the vocabulary ------------------------------------------------------------------------


def test_resize_token_embeddings_resizes_every_tenant_and_the_result_saves_and_loads(tenants, batch, tmp_path):
    model = MultiTenantMixtralForCausalLM.from_models(tenants).eval()
    before = {name: logits(model, batch, tenant=name) for name in model.tenants}
    model.resize_token_embeddings(model.config.vocab_size + 5)
    for name in model.tenants:
        assert model.model.embed_tokens[name].weight.shape[0] == model.config.vocab_size
        assert model.lm_head[name].weight.shape[0] == model.config.vocab_size
        assert_same_logits(logits(model, batch, tenant=name)[..., :-5], before[name])  # a wider head matmul
    assert model.lm_head["tied"].weight is model.model.embed_tokens["tied"].weight
    out = model.generate(**batch, max_new_tokens=2, tenant_names=["chat", "tied"], pad_token_id=0)
    assert out.shape[0] == 2
    model.save_pretrained(tmp_path)
    loaded = MultiTenantMixtralForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded, batch, tenant="code"), logits(model, batch, tenant="code"))
