"""Reliability: hostile or broken checkpoints are refused by name, no pickle is ever loaded, NaN/Inf
weights are refused, and saves are atomic.

Complements tests/test_sources.py and tests/test_tenants.py (which already cover incompatible
tenants, non-Mixtral sources, pickle-only source directories, wrong shapes, NaN in experts,
missing tensors, corrupt source files, shard indexes pointing outside, tenants without weights
and weights without tenants). docs/reliability.md counts every hostile input tried here.

Saved checkpoints are loaded two ways (the `load` parameter): through `strict_from_pretrained`
(multimoe/checkpoints.py) exactly as modeling.py's `from_pretrained` is to call it, and through
`MultiTenantMixtralForCausalLM.from_pretrained` itself. Saves likewise go through
`atomic_save_pretrained` (multimoe/saving.py) as `save_pretrained` is to call it, and through
`model.save_pretrained`. The `[model.from_pretrained]`, `[AutoModelForCausalLM]` and
`[model.save_pretrained]` cases need modeling.py's two methods to call those functions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import multimoe
from multimoe import CheckpointError, MultiTenantMixtralForCausalLM
from multimoe.checkpoints import TenantCheckpoint, strict_from_pretrained
from multimoe.saving import atomic_save_pretrained

# -- how checkpoints are loaded and saved ------------------------------------------------------


def load_with_helper(path, **kwargs):
    """What `MultiTenantMixtralForCausalLM.from_pretrained` does with the override pasted."""
    base_load = super(multimoe.modeling.MultiTenantPreTrainedModel, MultiTenantMixtralForCausalLM).from_pretrained
    return strict_from_pretrained(base_load, path, **kwargs)


def load_with_model(path, **kwargs):
    return MultiTenantMixtralForCausalLM.from_pretrained(path, **kwargs)


def save_with_helper(model, directory, **kwargs):
    """What `model.save_pretrained` does with the override pasted."""
    atomic_save_pretrained(super(multimoe.MultiTenantLM, model).save_pretrained, directory, **kwargs)


def save_with_model(model, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)


LOADERS = pytest.mark.parametrize(
    "load", [load_with_helper, load_with_model], ids=["strict_from_pretrained", "model.from_pretrained"]
)
SAVERS = pytest.mark.parametrize(
    "save", [save_with_helper, save_with_model], ids=["atomic_save_pretrained", "model.save_pretrained"]
)


def same_weights(model, reference) -> bool:
    ours, theirs = model.state_dict(), reference.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tenants):
    """A two-tenant model: `chat` fine-tunes `base`, so their expert maps differ."""
    return MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "chat": tenants["chat"]}).eval()


@pytest.fixture(scope="module")
def saved(pair, tmp_path_factory):
    """`pair` saved as one file and as shards."""
    root = tmp_path_factory.mktemp("saved")
    pair.save_pretrained(root / "single")
    pair.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root


def copy_of(saved: Path, layout: str, tmp_path: Path) -> Path:
    directory = tmp_path / layout
    shutil.copytree(saved / layout, directory)
    return directory


def shard_holding(directory: Path, key: str) -> Path:
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return directory / "model.safetensors"
    return directory / json.loads(index.read_text())["weight_map"][key]


def edit_tensor(directory: Path, key: str, change) -> None:
    path = shard_holding(directory, key)
    state = load_file(path)
    state[key] = change(state[key].clone())
    save_file(state, path, metadata={"format": "pt"})


def edit_config(directory: Path, change) -> None:
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def tenant_spec(config: dict, name: str) -> dict:
    """One tenant's entry in config.json's list of tenants (edited in place)."""
    return next(entry for entry in config["tenants"] if entry["name"] == name)


def rename_tenant(old: str, new: str):
    def change(config):
        tenant_spec(config, old)["name"] = new

    return change


def duplicate_tenant_key(directory: Path) -> None:
    """A hand edit of an earlier release's mapping of tenants that names `chat` twice, the second
    time with base's expert map: json.loads keeps the last, so chat's weights would run through
    base's experts."""
    config = json.loads((directory / "config.json").read_text())
    tenants = {entry.pop("name"): entry for entry in config["tenants"]}
    entries = [("base", tenants["base"]), ("chat", tenants["chat"]), ("chat", tenants["base"])]
    config["tenants"] = "TENANTS"
    text = json.dumps(config).replace(
        '"TENANTS"', "{" + ", ".join(f"{json.dumps(name)}: {json.dumps(spec)}" for name, spec in entries) + "}"
    )
    (directory / "config.json").write_text(text)


def set_map_entry(value):
    def change(config):
        tenant_spec(config, "chat")["expert_map"][0][0] = value

    return change


def pool_entry(layer: int, part: str) -> str:
    return f"model.layers.{layer}.experts.{part}"


ROUTER = "model.layers.1.tenants.chat.mlp.gate.weight"


@dataclass(frozen=True)
class Hostile:
    """An edit of a saved checkpoint, and how loading must refuse it."""

    edit: Callable[[Path], object]
    error: type[Exception]
    message: str
    layout: str = "single"
    before_building: bool = True  # refused before any model is constructed


def drop_safetensors_keep_pickle(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    torch.save({ROUTER: torch.zeros(4, 32)}, directory / "pytorch_model.bin")


def write_index(text: str):
    return lambda directory: (directory / "model.safetensors.index.json").write_text(text)


NAN_ROW, POOL_1 = torch.tensor([1]), pool_entry(1, "gate_up_proj")
SHARD = r"model-\d{5}-of-\d{5}\.safetensors"

HOSTILE_SAVED_CHECKPOINTS = {
    # files
    "truncated file": Hostile(
        lambda d: truncate(d / "model.safetensors"), CheckpointError,
        r"cannot read .*model\.safetensors: .*incomplete metadata"),
    "truncated shard": Hostile(
        lambda d: truncate(shard_holding(d, ROUTER)), CheckpointError, rf"cannot read .*{SHARD}", "sharded"),
    "not safetensors at all": Hostile(
        lambda d: (d / "model.safetensors").write_bytes(b"\x10" + bytes(7) + b"{not a header}"), CheckpointError,
        r"cannot read .*model\.safetensors"),
    "missing shard": Hostile(
        lambda d: shard_holding(d, ROUTER).unlink(), CheckpointError, rf"cannot read .*{SHARD}", "sharded"),
    "shard index pointing outside": Hostile(
        write_index(json.dumps({"weight_map": {ROUTER: "../elsewhere.safetensors"}})), CheckpointError,
        r"shard '\.\./elsewhere\.safetensors' lies outside", "sharded"),
    "shard index with a key twice": Hostile(
        write_index('{"weight_map": {"%s": "a.safetensors", "%s": "b.safetensors"}}' % (ROUTER, ROUTER)),
        CheckpointError, rf"index\.json: key '{ROUTER}' appears more than once", "sharded"),
    "pickle weights only": Hostile(
        drop_safetensors_keep_pickle, CheckpointError,
        r"no safetensors weights .*\['pytorch_model\.bin'\], which are pickle files and are never loaded"),
    # tensors
    "int32 tensor": Hostile(
        lambda d: edit_tensor(d, ROUTER, lambda t: t.to(torch.int32)), CheckpointError,
        rf"tensor '{ROUTER}' in model\.safetensors has dtype I32"),
    "bool tensor": Hostile(
        lambda d: edit_tensor(d, ROUTER, lambda t: t > 0), CheckpointError,
        rf"tensor '{ROUTER}' in {SHARD} has dtype BOOL", "sharded"),
    "tenant tensor of the wrong shape": Hostile(
        lambda d: edit_tensor(d, ROUTER, lambda t: t[:3].contiguous()), CheckpointError,
        rf"tensor '{ROUTER}' has shape \[3, 32\], the config implies \[4, 32\]", before_building=False),
    "pool tensor of the wrong shape": Hostile(
        lambda d: edit_tensor(d, POOL_1, lambda t: t[:-1].contiguous()), CheckpointError,
        rf"tensor '{POOL_1}' has shape \[5, 96, 32\], the config implies \[6, 96, 32\]", "sharded",
        before_building=False),
    "NaN in a tenant tensor": Hostile(
        lambda d: edit_tensor(d, ROUTER, lambda t: t.index_fill_(0, NAN_ROW, float("nan"))), CheckpointError,
        rf"tensor '{ROUTER}' contains NaN or Inf", before_building=False),
    "Inf in the pool": Hostile(
        lambda d: edit_tensor(d, POOL_1, lambda t: t.index_fill_(0, NAN_ROW, float("-inf"))), CheckpointError,
        rf"tensor '{POOL_1}' contains NaN or Inf", "sharded", before_building=False),
    # config.json
    "pool size edited": Hostile(
        lambda d: edit_config(d, lambda c: c["pool_sizes"].__setitem__(1, 7)), CheckpointError,
        rf"tensor '{pool_entry(1, 'down_proj')}' has shape \[6, 32, 48\], the config implies \[7, 32, 48\]",
        before_building=False),
    "expert map pointing outside the pool": Hostile(
        lambda d: edit_config(d, set_map_entry(6)), ValueError, r"'chat', layer 0: pool index 6 is outside the pool"),
    "negative expert map entry": Hostile(
        lambda d: edit_config(d, set_map_entry(-1)), ValueError, r"'chat', layer 0: pool index -1 is outside"),
    "boolean expert map entry": Hostile(
        lambda d: edit_config(d, set_map_entry(True)), ValueError, r"'chat', layer 0: pool index True is not an int"),
    "expert map row too short": Hostile(
        lambda d: edit_config(d, lambda c: tenant_spec(c, "chat")["expert_map"][1].pop()), ValueError,
        r"'chat', layer 1: expert_map row must list 4 pool indices"),
    "expert map with one row too many": Hostile(
        lambda d: edit_config(d, lambda c: tenant_spec(c, "chat")["expert_map"].append([0, 1, 2, 3])), ValueError,
        r"'chat': expert_map must have one row per layer \(2\)"),
    "tenants neither a list nor a mapping": Hostile(
        lambda d: edit_config(d, lambda c: c.__setitem__("tenants", "base")), ValueError,
        r"tenants must map tenant names to their specs, got str"),
    "tenant entry without a name": Hostile(
        lambda d: edit_config(d, lambda c: tenant_spec(c, "base").pop("name")), ValueError,
        r"Each entry of tenants must be an object with a 'name'"),
    "tenant listed twice": Hostile(
        lambda d: edit_config(d, lambda c: c["tenants"].append(tenant_spec(c, "chat"))), ValueError,
        r"Tenant 'chat' is listed more than once"),
    "tenant named twice": Hostile(
        duplicate_tenant_key, CheckpointError, r"config\.json: key 'chat' appears more than once"),
    "empty tenant name": Hostile(
        lambda d: edit_config(d, rename_tenant("chat", "")), ValueError, r"Invalid tenant name ''"),
    "tenant name ../x": Hostile(
        lambda d: edit_config(d, rename_tenant("chat", "../x")), ValueError, r"Invalid tenant name '\.\./x'"),
    "tenant name a/b": Hostile(
        lambda d: edit_config(d, rename_tenant("chat", "a/b")), ValueError, r"Invalid tenant name 'a/b'"),
    "tenant name with a trailing newline": Hostile(
        lambda d: edit_config(d, rename_tenant("chat", "chat\n")), ValueError, r"Invalid tenant name 'chat\\n'"),
}  # fmt: skip


@pytest.fixture
def count_builds(monkeypatch):
    """How many multi-tenant models get constructed."""
    built = []
    original = MultiTenantMixtralForCausalLM.__init__

    def init(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(MultiTenantMixtralForCausalLM, "__init__", init)
    return built


@LOADERS
@pytest.mark.parametrize("case", list(HOSTILE_SAVED_CHECKPOINTS))
def test_hostile_saved_checkpoint_is_refused_by_name(saved, tmp_path, load, case, count_builds):
    hostile = HOSTILE_SAVED_CHECKPOINTS[case]
    directory = copy_of(saved, hostile.layout, tmp_path)
    hostile.edit(directory)
    with pytest.raises(hostile.error, match=hostile.message):
        load(directory)
    if hostile.before_building:
        assert not count_builds


@LOADERS
def test_the_unedited_copies_load(saved, pair, tmp_path, load):
    # Guards the table above: each case fails because of its edit, not because of the copy.
    for layout in ("single", "sharded"):
        assert same_weights(load(copy_of(saved, layout, tmp_path)), pair)


@LOADERS
def test_variant_and_subfolder_checkpoints_still_load(pair, tmp_path, load):
    pair.save_pretrained(tmp_path / "repo" / "weights", variant="v2", max_shard_size="20KB")
    assert (tmp_path / "repo" / "weights" / "model.safetensors.index.v2.json").is_file()
    assert same_weights(load(tmp_path / "repo", subfolder="weights", variant="v2"), pair)


# -- tenant sources (from_models) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_source(tenants, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fused")
    tenants["code"].save_pretrained(directory, save_original_format=False)
    return directory


def test_integer_tensor_in_a_source_is_refused_from_its_header(tenants, fused_source, tmp_path, monkeypatch):
    directory = tmp_path / "bad"
    shutil.copytree(fused_source, directory)
    key = "model.layers.1.mlp.experts.gate_up_proj"
    edit_tensor(directory, key, lambda t: t.to(torch.int8))
    reads = []
    monkeypatch.setattr(TenantCheckpoint, "experts", lambda *args: reads.append(args))
    with pytest.raises(CheckpointError, match=rf"Tenant 'bad': tensor '{key}' in model\.safetensors has dtype I8"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "bad": directory})
    assert not reads


def test_source_config_with_a_key_twice_is_refused(tenants, fused_source, tmp_path):
    directory = tmp_path / "bad"
    shutil.copytree(fused_source, directory)
    text = (directory / "config.json").read_text()
    (directory / "config.json").write_text(text.replace("{", '{"num_local_experts": 8,', 1))
    with pytest.raises(CheckpointError, match=r"'bad': cannot read .*config\.json: key 'num_local_experts' appears"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "bad": directory})


@pytest.mark.parametrize("name", ["a/b", "..", "chat\n", "a\\b"])
def test_more_bad_tenant_names_are_rejected(tenants, name):
    with pytest.raises(ValueError, match="Invalid tenant name"):
        MultiTenantMixtralForCausalLM.from_models({name: tenants["base"]})


class MultiValuedMapping(Mapping):
    """Like aiohttp's MultiDict: a Mapping whose items() yields every pair, repeated keys included."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __getitem__(self, key):
        return next(value for name, value in self.pairs if name == key)

    def __iter__(self):
        return (name for name, _ in self.pairs)

    def __len__(self):
        return len(self.pairs)

    def items(self):
        return list(self.pairs)


def test_a_tenant_name_given_twice_is_refused_before_any_source_is_opened(tenants, monkeypatch):
    opened = []
    monkeypatch.setattr(TenantCheckpoint, "open", lambda *args, **kwargs: opened.append(args))
    sources = MultiValuedMapping([("base", tenants["base"]), ("chat", tenants["chat"]), ("chat", tenants["code"])])
    with pytest.raises(ValueError, match="'chat' is given more than once"):
        MultiTenantMixtralForCausalLM.from_models(sources)
    assert not opened


NON_EXPERT_TENSORS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.mlp.gate.weight",
    "model.norm.weight",
    "lm_head.weight",
]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", NON_EXPERT_TENSORS)
def test_non_finite_non_expert_tensor_is_named_at_build_time(tenants, key, value, count_builds):
    source = copy.deepcopy(tenants["chat"])
    with torch.no_grad():
        source.get_parameter(key).view(-1)[7] = value
    with pytest.raises(CheckpointError, match=rf"Tenant 'poisoned': {key} contains NaN or Inf"):
        MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "poisoned": source})
    assert not count_builds


# -- no pickle, ever -------------------------------------------------------------------------------


class TouchOnUnpickle:
    """Unpickling this creates a file: the proof that a decoy pickle was (not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def plant_decoy(directory: Path, marker: Path) -> None:
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(TouchOnUnpickle(marker)))


@pytest.fixture
def unpickling(monkeypatch):
    """Every call of torch.load, pickle.load/loads or pickle.Unpickler, recorded and refused."""
    calls = []

    def refuse(name):
        def refused(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called")

        return refused

    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    return calls


def lay_out_hub_cache(cache: Path, repo_id: str, files_from: Path) -> None:
    """The huggingface_hub cache layout, as in test_sources.py."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(files_from, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


SOURCE_KINDS = ["loaded model", "legacy directory", "fused directory", "sharded directory", "Hub repo id"]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_from_models_never_unpickles(tenants, tmp_path, monkeypatch, kind, unpickling):
    marker = tmp_path / "unpickled"
    directory = tmp_path / "source"
    if kind != "loaded model":
        save = dict(save_original_format=kind != "fused directory")
        if kind == "sharded directory":
            save["max_shard_size"] = "20KB"
        tenants["chat"].save_pretrained(directory, **save)
        plant_decoy(directory, marker)
    source = {"loaded model": tenants["chat"], "Hub repo id": "acme/chat"}.get(kind, directory)
    if kind == "Hub repo id":
        lay_out_hub_cache(tmp_path / "hub", "acme/chat", directory)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = MultiTenantMixtralForCausalLM.from_models({"base": tenants["base"], "chat": source})
    assert model.tenants == ["base", "chat"]
    assert not unpickling and not marker.exists()


def load_with_auto(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


@pytest.mark.parametrize(
    "load", [load_with_helper, load_with_model, load_with_auto],
    ids=["strict_from_pretrained", "model.from_pretrained", "AutoModelForCausalLM"],
)  # fmt: skip
@pytest.mark.parametrize("layout", ["single", "sharded", "pickle only"])
def test_from_pretrained_never_unpickles(saved, pair, tmp_path, load, layout, unpickling):
    marker = tmp_path / "unpickled"
    directory = copy_of(saved, "single" if layout == "pickle only" else layout, tmp_path)
    if layout == "pickle only":
        (directory / "model.safetensors").unlink()
    plant_decoy(directory, marker)
    if layout == "pickle only":
        with pytest.raises(CheckpointError, match="pickle files and are never loaded"):
            load(directory)
    else:
        assert same_weights(load(directory), pair)
    assert not unpickling and not marker.exists()


def test_the_decoy_does_leave_a_mark_when_unpickled(tmp_path):
    # Proves the decoy is a real tripwire, so that an absent marker above means something.
    plant_decoy(tmp_path, tmp_path / "unpickled")
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes())
    assert (tmp_path / "unpickled").exists()


# -- atomic saves ----------------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory`, by relative path, with a digest of its bytes."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def previous(multi, tokenizer, tmp_path):
    """A directory holding a sharded checkpoint of `multi`, its tokenizer and a notes folder."""
    directory = tmp_path / "parent" / "checkpoint"
    multi.save_pretrained(directory, max_shard_size="20KB")
    tokenizer.save_pretrained(directory)
    (directory / "notes").mkdir()
    (directory / "notes" / "eval.txt").write_text("accuracy 0.71")
    return directory


def interrupt_shard_writes(monkeypatch, exception: BaseException, after: int = 1) -> list[str]:
    """Make transformers' safetensors writes fail halfway: `after` shards are written, the next one
    is half-written, and then `exception` is raised."""
    written = []
    real_save = transformers.modeling_utils.safe_save_file

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        written.append(filename)
        if len(written) > after:
            truncate(Path(filename))
            raise exception

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    return written


@SAVERS
@pytest.mark.parametrize(
    "interruption", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk full", "Ctrl-C"]
)
def test_interrupted_save_leaves_the_previous_checkpoint_bit_exact(
    multi, pair, previous, monkeypatch, save, interruption
):
    before = snapshot(previous)
    written = interrupt_shard_writes(monkeypatch, interruption)
    with pytest.raises(type(interruption)):
        save(pair, previous, max_shard_size="20KB")
    monkeypatch.undo()
    assert len(written) == 2  # the interruption came halfway, not before the first write
    assert snapshot(previous) == before
    assert same_weights(MultiTenantMixtralForCausalLM.from_pretrained(previous), multi)
    assert [path.name for path in previous.parent.iterdir()] == ["checkpoint"]  # no temporary left over


def test_the_same_interruption_breaks_a_plain_transformers_save(pair, previous, monkeypatch):
    # Why the save must be atomic: transformers' own save, interrupted the same way, destroys the
    # previous checkpoint (a new config.json, the old shards deleted, the new ones half written).
    before = snapshot(previous)
    interrupt_shard_writes(monkeypatch, OSError(28, "No space left on device"))
    with pytest.raises(OSError):
        super(multimoe.MultiTenantLM, pair).save_pretrained(previous, max_shard_size="20KB")
    monkeypatch.undo()
    assert snapshot(previous) != before
    with pytest.raises(CheckpointError, match=rf"cannot read .*{SHARD}"):  # old shards gone, new ones half written
        load_with_helper(previous)


@SAVERS
def test_completed_save_replaces_the_weights_and_keeps_the_other_files(pair, previous, save):
    kept = {name: digest for name, digest in snapshot(previous).items() if name.startswith(("tokenizer", "notes"))}
    assert len(kept) >= 2
    save(pair, previous)
    files = snapshot(previous)
    assert {name: files.get(name) for name in kept} == kept
    assert not [name for name in files if name.startswith("model-") or name.endswith("index.json")]  # no stale shards
    assert same_weights(MultiTenantMixtralForCausalLM.from_pretrained(previous), pair)
    assert [path.name for path in previous.parent.iterdir()] == ["checkpoint"]


@SAVERS
def test_failed_swap_puts_the_previous_checkpoint_back(multi, pair, previous, monkeypatch, save):
    before = snapshot(previous)
    renames = []
    real_rename = os.rename

    def rename(source, destination):
        renames.append(Path(destination).name)
        if len(renames) == 2:  # the staged save -> the target
            raise OSError("rename failed")
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save(pair, previous)
    monkeypatch.undo()
    assert snapshot(previous) == before
    assert [path.name for path in previous.parent.iterdir()] == ["checkpoint"]


@SAVERS
def test_a_process_that_writes_nothing_leaves_the_directory_alone(pair, previous, save):
    before = snapshot(previous)
    save(pair, previous, is_main_process=False)
    assert snapshot(previous) == before
    assert [path.name for path in previous.parent.iterdir()] == ["checkpoint"]


@SAVERS
def test_saving_into_the_working_directory_warns_and_saves_in_place(pair, previous, monkeypatch, save):
    monkeypatch.chdir(previous)
    with pytest.warns(UserWarning, match="not atomically: it holds the current working directory"):
        save(pair, ".")
    assert Path.cwd() == previous.resolve()
    assert same_weights(MultiTenantMixtralForCausalLM.from_pretrained(previous), pair)


@SAVERS
def test_first_save_into_a_new_nested_directory(pair, tmp_path, save):
    save(pair, tmp_path / "a" / "b")
    assert same_weights(MultiTenantMixtralForCausalLM.from_pretrained(tmp_path / "a" / "b"), pair)
    assert [path.name for path in (tmp_path / "a").iterdir()] == ["b"]


def test_push_to_hub_keeps_the_directory_name_as_repo_id(tmp_path):
    received = {}

    def save(directory, **kwargs):
        received.update(kwargs)
        Path(directory, "config.json").write_text("{}")

    atomic_save_pretrained(save, tmp_path / "my-model", push_to_hub=True)
    assert received["repo_id"] == "my-model"
    assert (tmp_path / "my-model" / "config.json").is_file()
