"""Each tenant's own tokenizer and chat template: kept from its source's directory, saved in
`tenants/<name>/` beside its generation config, loaded back, kept or dropped with the tenant; the
shipped testbed's templates render exactly the prompts its tasks use."""

from __future__ import annotations

import shutil

import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoTokenizer

from multimoe import CheckpointError, MultiTenantMixtralForCausalLM, UnknownTenantError, consolidate, testbed
from multimoe.checkpoints import HUB_FILE_PATTERNS
from multimoe.testing import character_tokenizer

CHAT = [{"role": "user", "content": "hello"}]
TEMPLATES = {
    "base": "{{- messages[-1]['content'] -}}",
    "chat": "{%- for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def render(tokenizer) -> str:
    return tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def sources(tenants, tmp_path_factory):
    """Directories of `base` and `chat` with tokenizers of their own (chat's adds special tokens and
    another template), and of `code` with none."""
    root = tmp_path_factory.mktemp("sources")
    for name in ("base", "chat", "code"):
        tenants[name].save_pretrained(root / name)
    for name, template in TEMPLATES.items():
        tokenizer = character_tokenizer()
        tokenizer.chat_template = template
        if name == "chat":
            tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
        tokenizer.save_pretrained(root / name)
    return {name: root / name for name in ("base", "chat", "code")}


@pytest.fixture(scope="module")
def model(sources, tenants):
    return MultiTenantMixtralForCausalLM.from_models(sources | {"tied": tenants["tied"]})


def assert_own_tokenizers(model) -> None:
    assert model.tenant_tokenizers.keys() == {"base", "chat"}
    for name, template in TEMPLATES.items():
        assert model.tokenizer_for(name).chat_template == template
    assert render(model.tokenizer_for("base")) == "hello"
    assert render(model.tokenizer_for("chat")) == "<|user|>hello<|assistant|>"
    assert model.tokenizer_for("chat").convert_tokens_to_ids("<|assistant|>") == len(character_tokenizer()) + 1


def test_from_models_keeps_each_source_directory_s_tokenizer(model):
    assert_own_tokenizers(model)


def test_tenants_without_one_fall_back_to_the_default_or_are_refused(model, tokenizer):
    assert model.tokenizer_for("code", default=tokenizer) is tokenizer
    assert model.tokenizer_for("chat", default=tokenizer) is model.tenant_tokenizers["chat"]
    with pytest.raises(ValueError, match=r"No tokenizer is known for tenant 'tied'"):
        model.tokenizer_for("tied")
    with pytest.raises(UnknownTenantError, match=r"Unknown tenant 'nope'"):
        model.tokenizer_for("nope", default=tokenizer)


def test_in_memory_sources_have_no_tokenizer_of_their_own(multi):
    assert multi.tenant_tokenizers == {}


def test_save_and_load_keep_each_tenant_s_tokenizer_beside_its_generation_config(model, tmp_path):
    model.save_pretrained(tmp_path)
    for name in ("base", "chat"):
        assert {path.name for path in (tmp_path / "tenants" / name).iterdir()} == {
            "generation_config.json", *TOKENIZER_FILES
        }
    assert [path.name for path in (tmp_path / "tenants" / "code").iterdir()] == ["generation_config.json"]
    assert "| `chat` | " in (tmp_path / "README.md").read_text()
    assert "| own, with a chat template |" in (tmp_path / "README.md").read_text()
    assert_own_tokenizers(MultiTenantMixtralForCausalLM.from_pretrained(tmp_path))


def test_a_checkpoint_of_an_earlier_release_has_no_tenant_tokenizers(model, tmp_path):
    model.save_pretrained(tmp_path)
    for path in tmp_path.glob("tenants/*/*"):
        if path.name in TOKENIZER_FILES:
            path.unlink()
    assert MultiTenantMixtralForCausalLM.from_pretrained(tmp_path).tenant_tokenizers == {}


def test_hub_repos_give_their_tokenizers(model, sources, tmp_path, monkeypatch):
    """Through the offline cache, as a Hub id resolves; the files a fetch asks for include them."""
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    model.save_pretrained(tmp_path / "saved")
    for repo, directory in (("saved", tmp_path / "saved"), ("chat", sources["chat"])):
        shutil.copytree(directory, tmp_path / f"models--acme--{repo}" / "snapshots" / commit)
        (tmp_path / f"models--acme--{repo}" / "refs").mkdir()
        (tmp_path / f"models--acme--{repo}" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_own_tokenizers(MultiTenantMixtralForCausalLM.from_pretrained("acme/saved"))
    built = MultiTenantMixtralForCausalLM.from_models({"chat": "acme/chat"})
    assert built.tokenizer_for("chat").chat_template == TEMPLATES["chat"]
    tenant_files = [path.relative_to(tmp_path / "saved").as_posix() for path in tmp_path.glob("saved/tenants/*/*")]
    assert sorted(filter_repo_objects(tenant_files, allow_patterns=HUB_FILE_PATTERNS)) == sorted(tenant_files)


def test_consolidate_keeps_them(sources):
    assert_own_tokenizers(consolidate(sources, progress=False))


def test_add_tenant_keeps_the_source_s_tokenizer_and_remove_tenant_drops_it(sources, tenants):
    model = MultiTenantMixtralForCausalLM.from_models({"base": sources["base"], "tied": tenants["tied"]})
    model.add_tenant("chat", sources["chat"])
    model.add_tenant("code", sources["code"])
    assert_own_tokenizers(model)
    model.remove_tenant("chat")
    assert model.tenant_tokenizers.keys() == {"base"}


def test_broken_tokenizer_files_are_refused_naming_the_tenant(sources, tenants, model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sources["chat"], broken)
    (broken / "tokenizer.json").write_text("{broken")
    refusal = r"Tenant 'chat': cannot read the tokenizer in .*broken"
    with pytest.raises(CheckpointError, match=refusal):
        MultiTenantMixtralForCausalLM.from_models({"base": sources["base"], "chat": broken})
    built = MultiTenantMixtralForCausalLM.from_models({"base": sources["base"]})
    with pytest.raises(CheckpointError, match=refusal):
        built.add_tenant("chat", broken)
    assert built.tenants == ["base"] and built.tenant_tokenizers.keys() == {"base"}  # refused before any change
    model.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "tenants" / "chat" / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"Tenant 'chat': cannot read the tokenizer in .*tenants/chat"):
        MultiTenantMixtralForCausalLM.from_pretrained(tmp_path / "saved")


# -- the shipped testbed -----------------------------------------------------------------------


def test_the_testbed_templates_render_the_task_prompts_exactly():
    templates = set()
    for name in (testbed.BASE, *testbed.TASKS):
        tokenizer = AutoTokenizer.from_pretrained(testbed.checkpoint(name))
        templates.add(tokenizer.chat_template)
        for task in testbed.TASKS.values():
            for example in task.held_out(20):
                chat = [{"role": "user", "content": example.prompt}]
                assert tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == example.prompt
    assert len(templates) == 1 + len(testbed.TASKS)  # each tenant's own, told apart by a comment


def test_a_chat_completion_on_the_testbed_answers_the_task():
    model = MultiTenantMixtralForCausalLM.from_models({name: testbed.checkpoint(name) for name in ("add", "reverse")})
    for name, prompt, answer in (("add", "12+34=", "46"), ("reverse", "rev abcd=", "dcba")):
        tokenizer = model.tokenizer_for(name)
        chat = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
        with torch.no_grad():
            output = model.eval().generate(**inputs, tenant=name, max_new_tokens=len(answer) + 1, do_sample=False)
        assert tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == answer
