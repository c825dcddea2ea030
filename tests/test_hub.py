"""Publishing: model card, remote code without multimoe installed, push_to_hub, Hub-cache loading."""

from __future__ import annotations

import copy
import json
import shutil
import socket

import pytest
import torch
import yaml
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HTTPError

from multimoe import CheckpointError, MultiTenantMixtralForCausalLM
from multimoe.hub import model_card
from multimoe.testing import run_without_multimoe


@pytest.fixture(scope="module")
def saved(multi, tmp_path_factory):
    directory = tmp_path_factory.mktemp("published") / "four-tenants"
    multi.save_pretrained(directory)
    return directory


def front_matter(readme: str) -> dict:
    _, metadata, _ = readme.split("---", 2)
    return yaml.safe_load(metadata)


def test_model_card_lists_tenants_pool_and_memory(multi, saved):
    readme = (saved / "README.md").read_text()
    metadata = front_matter(readme)
    assert metadata["library_name"] == "transformers"
    assert {"multimoe", "mixtral", "multi-tenant"} <= set(metadata["tags"])
    assert "# four-tenants: 4 Mixtral tenants, one shared expert pool" in readme
    for name in multi.tenants:
        assert f"| `{name}` |" in readme
    assert "Experts stored per layer: " + ", ".join(map(str, multi.config.pool_sizes)) in readme
    assert "| saving |" in readme


def test_model_card_names_hub_sources_as_base_models(multi):
    original = {name: spec["source"] for name, spec in multi.config.tenants.items()}
    try:
        multi.config.tenants["base"]["source"] = "mistralai/Mixtral-8x7B-v0.1"
        multi.config.tenants["chat"]["source"] = "mistralai/Mixtral-8x7B-Instruct-v0.1"
        metadata = front_matter(model_card(multi))
    finally:
        for name, source in original.items():
            multi.config.tenants[name]["source"] = source
    assert metadata["base_model"] == ["mistralai/Mixtral-8x7B-Instruct-v0.1", "mistralai/Mixtral-8x7B-v0.1"]


def test_model_card_links_no_package_index_page(multi):
    readme = model_card(multi)
    assert "pypi.org" not in readme  # multimoe has no package index page
    assert "Made with the `multimoe` library" in readme


def test_saved_checkpoint_carries_auto_map_and_code(saved):
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration.MultiTenantMixtralConfig",
        "AutoModelForCausalLM": "modeling.MultiTenantMixtralForCausalLM",
    }
    for module in ("configuration.py", "modeling.py", "routing.py", "checkpoints.py"):
        assert (saved / module).is_file(), module


REMOTE_CODE = r"""
import sys
sys.modules["multimoe"] = None  # multimoe is not installed, as far as this process can tell
import torch
from transformers import AutoModelForCausalLM
try:
    import multimoe  # noqa: F401
    raise SystemExit("multimoe should not be importable here")
except ImportError:
    pass
directory, inputs_path, out_path = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
inputs = torch.load(inputs_path)
with torch.no_grad():
    logits = {name: model(**inputs, tenant=name).logits for name in model.tenants}
torch.save({"class": type(model).__module__ + "." + type(model).__name__, "logits": logits}, out_path)
"""


def test_loads_with_trust_remote_code_where_multimoe_is_not_installed(multi, saved, batch, tmp_path):
    inputs_path, out_path = tmp_path / "inputs.pt", tmp_path / "out.pt"
    torch.save(dict(batch), inputs_path)
    run_without_multimoe(REMOTE_CODE, str(saved), str(inputs_path), str(out_path), workdir=tmp_path)
    remote = torch.load(out_path)
    assert remote["class"].startswith("transformers_modules.") and remote["class"].endswith("MultiTenantMixtralForCausalLM")
    with torch.no_grad():
        for name in multi.tenants:
            assert torch.equal(remote["logits"][name], multi(**batch, tenant=name).logits), name


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """HfApi with its repo and commit calls intercepted: commits are recorded, nothing leaves."""
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            files[operation.path_in_repo] = open(source, "rb").read() if isinstance(source, str) else source
        commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return commits


def test_push_to_hub_uploads_exactly_the_checkpoint_and_it_loads_back(
    multi, tokenizer, batch, fake_hub, tmp_path, monkeypatch
):
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = "{{- messages[-1]['content'] -}}"
    monkeypatch.setattr(multi, "tenant_tokenizers", {"chat": chat_tokenizer})  # as a source directory's would be
    multi.push_to_hub("acme/four-tenants", tokenizer=tokenizer, commit_message="first")
    (commit,) = fake_hub
    assert commit["repo_id"] == "acme/four-tenants" and commit["commit_message"] == "first"
    files = commit["files"]
    python_files = {"configuration.py", "modeling.py", "routing.py", "checkpoints.py", "alignment.py", "memory.py",
                    "saving.py", "hub.py", "generation.py", "validation.py", "concurrency.py", "families.py",
                    "modeling_seq2seq.py", "batched_projections.py", "pool_window.py", "pool_padding.py", "expert_deltas.py"}
    tenant_files = {f"tenants/{name}/generation_config.json" for name in multi.tenants} | {
        "tenants/chat/tokenizer.json", "tenants/chat/tokenizer_config.json", "tenants/chat/chat_template.jinja"
    }
    assert set(files) == {"config.json", "generation_config.json", "model.safetensors", "README.md",
                          "tokenizer.json", "tokenizer_config.json"} | python_files | tenant_files
    config = json.loads(files["config.json"])
    assert config["tenants"] == [{"name": name} | spec for name, spec in multi.config.tenants.items()]
    assert config["pool_sizes"] == multi.config.pool_sizes
    assert "# four-tenants: 4 Mixtral tenants" in files["README.md"].decode()
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for name, content in files.items():
        (pulled / name).parent.mkdir(parents=True, exist_ok=True)
        (pulled / name).write_bytes(content)
    loaded = MultiTenantMixtralForCausalLM.from_pretrained(pulled).eval()
    with torch.no_grad():
        for name in multi.tenants:
            assert torch.equal(loaded(**batch, tenant=name).logits, multi(**batch, tenant=name).logits)
    assert loaded.tenant_tokenizers.keys() == {"chat"}
    assert loaded.tokenizer_for("chat").chat_template == chat_tokenizer.chat_template


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The Hub endpoint: a local port that nothing listens on (just freed), so every request is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return endpoint


def test_push_to_hub_without_network_says_what_failed(multi, unreachable_hub):
    message = (rf"push_to_hub could not reach the Hugging Face Hub at {unreachable_hub} to create the repo "
               r"'acme/four-tenants' \(ConnectError: .+\); check the network connection, or HF_ENDPOINT")
    with pytest.raises(ConnectionError, match=message) as raised:
        multi.push_to_hub("acme/four-tenants", token="hf_offline")
    assert type(raised.value.__cause__).__name__ == "ConnectError"


def test_push_to_hub_names_the_upload_when_the_connection_drops_there(multi, fake_hub, monkeypatch):
    def create_commit(self, **kwargs):
        raise HTTPError("Server disconnected without sending a response.")

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    with pytest.raises(ConnectionError, match=r"to upload to 'acme/four-tenants' \(HTTPError: Server disconnected"):
        multi.push_to_hub("acme/four-tenants")


def test_from_pretrained_hub_id_and_revision_through_the_offline_cache(multi, saved, batch, tmp_path, monkeypatch):
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "models--acme--four-tenants"
    shutil.copytree(saved, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = MultiTenantMixtralForCausalLM.from_pretrained("acme/four-tenants", revision="v1", cache_dir=tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch, tenant="code").logits, multi(**batch, tenant="code").logits)
    assert loaded.generation_configs.keys() == multi.generation_configs.keys()


def test_a_hostile_hub_checkpoint_is_refused_before_anything_is_allocated(saved, tmp_path, monkeypatch):
    """A Hub repo is fetched into the cache and checked against its headers, as a directory is."""
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    snapshot = tmp_path / "models--acme--hostile" / "snapshots" / commit
    shutil.copytree(saved, snapshot)
    config = json.loads((snapshot / "config.json").read_text())
    config["pool_sizes"] = [10**7] * len(config["pool_sizes"])
    (snapshot / "config.json").write_text(json.dumps(config))
    (tmp_path / "models--acme--hostile" / "refs").mkdir()
    (tmp_path / "models--acme--hostile" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refusal = r"experts\.down_proj' has shape \[\d+, 32, 48\], the config implies \[10000000"
    with pytest.raises(CheckpointError, match=refusal):
        MultiTenantMixtralForCausalLM.from_pretrained("acme/hostile", cache_dir=tmp_path)
