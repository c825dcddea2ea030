"""Every supported MoE family, end to end: sources in both checkpoint layouts, lossless logits and
generations against each tenant's own model, mixed batches, saving and reloading (also as remote
code), the experts implementation in use, and clear refusals.

Each family gets two fine-tunes of one random base, `zeta` and `alpha` (named so that their sorted
order differs from the order given): `zeta` changed experts {0, 1}, `alpha` {1, 3}, so they share
expert 2 (and, in DeepSeek-V3's eight, experts 4-7) and `alpha`'s other experts land on other pool
indices than in its own model.

Tolerance: a tenant's experts sit at other pool indices than in its own model and the pool holds
more experts, so torch's CPU `grouped_mm` gets other group sizes and offsets (and, in a mixed batch,
other rows around each row); on some CPUs (seen on AVX-512) it then sums in another order and the
logits (magnitude ~1) differ by a few ulps, ~1e-6. Logits of separately built models are therefore
compared within `TOLERANCE`; weights, and a saved model against itself reloaded, bit-exactly.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cached_property
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

import multimoe
from multimoe import CheckpointError, IncompatibleTenantsError, UnsupportedFamilyError
from multimoe.checkpoints import SafetensorsFiles, TenantCheckpoint
from multimoe.testing import character_tokenizer, fine_tune, random_model, run_without_multimoe, tiny_config

FAMILY_TYPES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
STEMS = {
    "mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe",
    "deepseek_v3": "DeepseekV3", "gpt_oss": "GptOss",
}
# The per-expert names of the legacy layout transformers' conversion mapping reads (and, in 5.x,
# writes by default); gpt-oss has none: its checkpoints were always fused.
LEGACY_EXPERT_KEY = {
    "mixtral": r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]\.weight",
    **{family: r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight"
       for family in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")},
}
FUSED_EXPERT_KEY = r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?"

TOLERANCE = 1e-5
NAMES = ["zeta", "alpha"]  # the order given; sorted, it is the other way round
PROMPTS = ["hello there", "hi", "what is 2+2?"]
MIXED_ROWS = ["alpha", "zeta", "alpha"]
GREEDY = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, message: str = "") -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE, msg=lambda m: f"{message}\n{m}")


def safetensors_keys(directory: Path) -> list[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        return list(handle.keys())


def assert_same_weights(model, reference) -> None:
    actual, expected = model.state_dict(), reference.state_dict()
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def expert_maps(model) -> dict[str, list[list[int]]]:
    return {name: spec["expert_map"] for name, spec in model.config.tenants.items()}


class Case:
    """One family's tenants, their multi-tenant model and the directories built from them, each
    made on first use."""

    def __init__(self, family: str, root: Path):
        self.family, self.root = family, root
        base = random_model(tiny_config(family), seed=0)
        self.originals = {
            "zeta": fine_tune(base, seed=1, changed_experts=[0, 1]),
            "alpha": fine_tune(base, seed=2, changed_experts=[1, 3]),
        }

    @property
    def legacy_layout(self) -> bool:
        return self.family in LEGACY_EXPERT_KEY

    @cached_property
    def multi(self):
        return multimoe.from_models(dict(self.originals)).eval()

    @cached_property
    def sources(self) -> dict[str, dict[str, Path]]:
        """Each tenant saved by its own class: `default` (what `save_pretrained` writes) and `fused`
        (`save_original_format=False`, transformers' v5 layout)."""
        directories = {}
        for layout, options in (("default", {}), ("fused", {"save_original_format": False})):
            directories[layout] = {}
            for name, model in self.originals.items():
                directory = self.root / "sources" / layout / name
                model.save_pretrained(directory, **options)
                directories[layout][name] = directory
        return directories

    @cached_property
    def saved(self) -> Path:
        directory = self.root / f"saved-{self.family}"
        self.multi.save_pretrained(directory)
        return directory


class Cases(dict):
    def __init__(self, tmp_path_factory):
        super().__init__()
        self.tmp_path_factory = tmp_path_factory

    def __missing__(self, family: str) -> Case:
        self[family] = Case(family, self.tmp_path_factory.mktemp(family))
        return self[family]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Cases:
    return Cases(tmp_path_factory)


@pytest.fixture(scope="module")
def inputs():
    """Three left-padded rows of different lengths."""
    return character_tokenizer()(PROMPTS, return_tensors="pt", padding=True)


def logits(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if any weight of a source is read or a model is allocated."""

    def refuse(what):
        def read(*args, **kwargs):
            raise AssertionError(f"{what} was called before the sources were refused")
        return read

    monkeypatch.setattr(TenantCheckpoint, "experts", refuse("TenantCheckpoint.experts"))
    monkeypatch.setattr(TenantCheckpoint, "tensor", refuse("TenantCheckpoint.tensor"))
    monkeypatch.setattr(SafetensorsFiles, "get", refuse("SafetensorsFiles.get"))
    monkeypatch.setattr(multimoe.MultiTenantForCausalLM, "from_assembly", classmethod(refuse("from_assembly")))


# -- 1. sources: loaded models and directories in both layouts --------------------------------------------


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_from_models_picks_the_family_class(cases, family):
    multi = cases[family].multi
    assert type(multi) is getattr(multimoe, f"MultiTenant{STEMS[family]}ForCausalLM")
    assert type(multi).__name__ == f"MultiTenant{STEMS[family]}ForCausalLM"
    assert multi.config.model_type == f"multitenant_{family}"
    assert multi.tenants == NAMES and multi.active_model == "zeta"


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_save_pretrained_writes_the_layout_we_claim(cases, family):
    """transformers 5.24 writes the legacy per-expert layout by default where it has a conversion
    mapping for the family, the fused one with `save_original_format=False`; gpt-oss is always fused."""
    case = cases[family]
    default = safetensors_keys(case.sources["default"]["zeta"])
    fused = safetensors_keys(case.sources["fused"]["zeta"])
    assert any(re.fullmatch(FUSED_EXPERT_KEY, key) for key in fused)
    assert not any(re.fullmatch(r".*\.experts\.\d+\..*", key) for key in fused)
    if case.legacy_layout:
        assert any(re.fullmatch(LEGACY_EXPERT_KEY[family], key) for key in default)
        assert not any(re.fullmatch(FUSED_EXPERT_KEY, key) for key in default)
    else:
        assert default == fused


LAYOUT_CASES = [(family, layout) for family in FAMILY_TYPES for layout in ("default", "fused", "default+loaded")]


@pytest.mark.parametrize("family, layout", LAYOUT_CASES, ids=[f"{f}-{l}" for f, l in LAYOUT_CASES])
def test_from_directories_builds_the_same_model_as_from_loaded_models(cases, inputs, family, layout):
    """Directories in either layout (and mixed with a loaded model) give bit-identical weights and
    the same pool and maps as the loaded models, and the tenants' own logits."""
    case = cases[family]
    if layout == "default+loaded":
        sources = {"zeta": case.sources["default"]["zeta"], "alpha": case.originals["alpha"]}
    else:
        sources = {"zeta": str(case.sources[layout]["zeta"]), "alpha": case.sources[layout]["alpha"]}
    model = multimoe.from_models(sources).eval()
    assert type(model) is type(case.multi)
    assert model.tenants == NAMES
    assert model.config.pool_sizes == case.multi.config.pool_sizes
    assert expert_maps(model) == expert_maps(case.multi)
    assert model.config.tenants["zeta"]["source"] == str(sources["zeta"])
    assert_same_weights(model, case.multi)
    mask = inputs["attention_mask"].bool()
    for name in NAMES:
        assert_close(logits(model, inputs, tenant=name)[mask], logits(case.originals[name], inputs)[mask], name)


# -- 2. lossless against each tenant's own model ------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_tenants_differ_and_alpha_reads_other_pool_entries(cases, inputs, family):
    """Guards against fixtures that would make the comparisons below vacuous."""
    case = cases[family]
    assert (logits(case.originals["zeta"], inputs) - logits(case.originals["alpha"], inputs)).abs().max() > 1e-2
    sparse = [index for index, size in enumerate(case.multi.config.pool_sizes) if size]
    num_experts = len(expert_maps(case.multi)["zeta"][sparse[0]])
    assert sparse and all(size == num_experts + 3 for size in case.multi.config.pool_sizes if size)
    for layer in sparse:
        assert expert_maps(case.multi)["zeta"][layer] == list(range(num_experts))
        assert expert_maps(case.multi)["alpha"][layer] != list(range(num_experts))


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_left_padded_logits_match_each_tenants_own_model(cases, inputs, family):
    case = cases[family]
    mask = inputs["attention_mask"].bool()
    assert not mask.all()  # really left-padded
    for name in NAMES:
        expected = logits(case.originals[name], inputs)
        assert_close(logits(case.multi, inputs, tenant=name)[mask], expected[mask], name)
        with case.multi.active(name):
            assert_close(logits(case.multi, inputs)[mask], expected[mask], name)
        assert_close(
            logits(case.multi, inputs, tenant=name, use_cache=False)[mask],
            logits(case.originals[name], inputs, use_cache=False)[mask],
            name,
        )


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_incremental_decoding_with_a_kv_cache_matches(cases, inputs, family):
    case = cases[family]
    steps = torch.tensor([[5, 9], [7, 11], [12, 30]])

    def decode(model, **kwargs):
        cache = DynamicCache(config=model.config)
        mask = inputs["attention_mask"]
        with torch.no_grad():
            out = model(input_ids=inputs["input_ids"], attention_mask=mask, cache=cache, use_cache=True, **kwargs)
            collected = [out.logits[:, -1]]
            for step in steps.T:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out = model(input_ids=step[:, None], attention_mask=mask, cache=out.cache, use_cache=True, **kwargs)
                collected.append(out.logits[:, -1])
        return torch.stack(collected)

    for name in NAMES:
        assert_close(decode(case.multi, tenant=name), decode(case.originals[name]), name)


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_greedy_generation_is_token_identical(cases, inputs, family, use_cache):
    case = cases[family]
    for name in NAMES:
        expected = case.originals[name].generate(**inputs, **GREEDY, use_cache=use_cache)
        assert torch.equal(case.multi.generate(**inputs, **GREEDY, use_cache=use_cache, tenant=name), expected), name


# -- 3. mixed batches ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_mixed_batch_rows_match_their_own_models(cases, inputs, family):
    case = cases[family]
    actual = logits(case.multi, inputs, tenant_names=MIXED_ROWS)
    for row, name in enumerate(MIXED_ROWS):
        mask = inputs["attention_mask"][row].bool()
        assert_close(actual[row][mask], logits(case.originals[name], inputs)[row][mask], f"row {row} ({name})")
    assert case.multi.active_model == "zeta"


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_mixed_batch_greedy_generation_matches_row_by_row(cases, inputs, family):
    case = cases[family]
    expected = {name: model.generate(**inputs, **GREEDY) for name, model in case.originals.items()}
    output = case.multi.generate(**inputs, **GREEDY, tenant_names=MIXED_ROWS)
    for row, name in enumerate(MIXED_ROWS):
        assert torch.equal(output[row], expected[name][row]), (row, name)
    uncached = case.multi.generate(**inputs, **GREEDY, tenant_names=MIXED_ROWS, use_cache=False)
    assert torch.equal(uncached, output)


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_mixed_batch_rows_match_their_own_models_with_eager_experts(cases, inputs, family):
    """The mixed batch through the family's eager experts loop, which checks no shapes (a wrong
    routing there gives wrong numbers, not an error)."""
    case = cases[family]
    model = type(case.multi).from_pretrained(case.saved).eval()
    model.set_experts_implementation("eager")
    actual = logits(model, inputs, tenant_names=MIXED_ROWS)
    for row, name in enumerate(MIXED_ROWS):
        mask = inputs["attention_mask"][row].bool()
        assert_close(actual[row][mask], logits(case.originals[name], inputs)[row][mask], f"row {row} ({name})")


# -- 4. saving and reloading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_save_and_reload_keeps_class_type_order_and_bits(cases, inputs, family):
    case = cases[family]
    class_name = f"MultiTenant{STEMS[family]}ForCausalLM"
    config = json.loads((case.saved / "config.json").read_text())
    assert config["model_type"] == f"multitenant_{family}"
    assert config["architectures"] == [class_name]
    assert [entry["name"] for entry in config["tenants"]] == NAMES
    assert type(AutoConfig.from_pretrained(case.saved)).__name__ == f"MultiTenant{STEMS[family]}Config"
    by_class = getattr(multimoe, class_name).from_pretrained(case.saved).eval()
    by_auto = AutoModelForCausalLM.from_pretrained(case.saved).eval()
    by_generic = multimoe.MultiTenantForCausalLM.from_pretrained(case.saved).eval()  # the family from the checkpoint
    for loaded in (by_class, by_auto, by_generic):
        assert type(loaded).__name__ == class_name and type(loaded) is type(case.multi)
        assert loaded.config.model_type == f"multitenant_{family}"
        assert loaded.tenants == NAMES and loaded.active_model == "zeta"
        assert expert_maps(loaded) == expert_maps(case.multi)
        assert_same_weights(loaded, case.multi)
        for name in NAMES:
            assert torch.equal(logits(loaded, inputs, tenant=name), logits(case.multi, inputs, tenant=name)), name
    for name in NAMES:
        assert torch.equal(by_auto.generate(**inputs, **GREEDY, tenant=name),
                           case.multi.generate(**inputs, **GREEDY, tenant=name)), name


# -- 5. remote code where multimoe is not installed -----------------------------------------------------------

REMOTE_CODE = r"""
import sys, traceback
sys.modules["multimoe"] = None  # multimoe is not installed, as far as this process can tell
import torch
from transformers import AutoModelForCausalLM
try:
    import multimoe  # noqa: F401
    raise SystemExit("multimoe should not be importable here")
except ImportError:
    pass
inputs_path, out_path, *directories = sys.argv[1:]
inputs = torch.load(inputs_path)
results = {}
for directory in directories:
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = {name: model(**inputs, tenant=name).logits for name in model.tenants}
        results[directory] = {"class": type(model).__module__ + "." + type(model).__name__,
                              "model_type": model.config.model_type, "tenants": model.tenants, "logits": logits}
    except Exception:
        results[directory] = {"error": traceback.format_exc()}
torch.save(results, out_path)
"""


@pytest.fixture(scope="module")
def remote(cases, inputs, tmp_path_factory) -> dict[str, dict]:
    """Every family's saved checkpoint loaded with `trust_remote_code=True` in one fresh process
    where multimoe cannot be imported (one process for all: each start costs seconds)."""
    work = tmp_path_factory.mktemp("remote")
    inputs_path, out_path = work / "inputs.pt", work / "out.pt"
    torch.save(dict(inputs), inputs_path)
    directories = {family: str(cases[family].saved) for family in FAMILY_TYPES}
    run_without_multimoe(REMOTE_CODE, str(inputs_path), str(out_path), *directories.values(), workdir=work)
    loaded = torch.load(out_path)
    return {family: loaded[directory] for family, directory in directories.items()}


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_loads_as_remote_code_where_multimoe_is_not_installed(cases, inputs, remote, family):
    result = remote[family]
    assert "error" not in result, result.get("error")
    assert result["class"].startswith("transformers_modules.")
    assert result["class"].endswith(f".MultiTenant{STEMS[family]}ForCausalLM")
    assert result["model_type"] == f"multitenant_{family}" and result["tenants"] == NAMES
    for name in NAMES:
        assert torch.equal(result["logits"][name], logits(cases[family].multi, inputs, tenant=name)), name


# -- 6. the experts implementation ----------------------------------------------------------------------------


@pytest.fixture
def experts_calls(monkeypatch):
    """The experts implementation each experts call asks transformers' registry for, and the modules
    `grouped_mm` ran for (a pool, for a call on a window of its entries: see multimoe.pool_window)."""
    calls = {"requested": [], "grouped_mm": []}
    grouped_mm = ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    get_interface = ExpertsInterface.get_interface

    def counting_grouped_mm(module, *args, **kwargs):
        calls["grouped_mm"].append(getattr(module, "pool", module))
        return grouped_mm(module, *args, **kwargs)

    def recording_get_interface(self, implementation, default):
        calls["requested"].append(implementation)
        return get_interface(self, implementation, default)

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, "grouped_mm", counting_grouped_mm)
    monkeypatch.setattr(ExpertsInterface, "get_interface", recording_get_interface)
    return calls


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_the_pool_runs_grouped_mm_by_default_and_eager_on_request(cases, inputs, experts_calls, family):
    case = cases[family]
    model = type(case.multi).from_pretrained(case.saved).eval()  # a copy to switch: the shared model stays
    pools = [layer.experts for layer in model.model.layers if hasattr(layer, "experts")]
    mask = inputs["attention_mask"].bool()
    assert model.config._experts_implementation == "grouped_mm"
    default = logits(model, inputs, tenant="alpha")
    assert experts_calls["requested"] == ["grouped_mm"] * len(pools)
    assert [id(module) for module in experts_calls["grouped_mm"]] == [id(pool) for pool in pools]
    experts_calls["requested"].clear(), experts_calls["grouped_mm"].clear()
    model.set_experts_implementation("eager")
    assert model.config._experts_implementation == "eager"
    eager = logits(model, inputs, tenant="alpha")
    assert experts_calls["requested"] == ["eager"] * len(pools)
    assert not experts_calls["grouped_mm"]
    expected = logits(case.originals["alpha"], inputs)
    assert_close(default[mask], expected[mask], "grouped_mm")
    assert_close(eager[mask], expected[mask], "eager")


# -- 7. clear refusals, before any weight is read --------------------------------------------------------------


def other_family(family: str) -> str:
    return FAMILY_TYPES[(FAMILY_TYPES.index(family) + 1) % len(FAMILY_TYPES)]


def dense_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=47, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_tenants_of_two_families_are_refused_naming_both(cases, family, no_weight_reads):
    other = cases[other_family(family)]
    message = (rf"Tenants 'zeta' and 'intruder' are of different families: '{family}' and "
               rf"'{other.family}'; one model serves fine-tunes of one family")
    case = cases[family]
    with pytest.raises(IncompatibleTenantsError, match=message):
        multimoe.from_models({"zeta": case.originals["zeta"], "intruder": other.originals["alpha"]})
    with pytest.raises(IncompatibleTenantsError, match=message):
        multimoe.from_models({"zeta": case.sources["default"]["zeta"], "intruder": other.sources["fused"]["alpha"]})


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_a_dense_model_is_refused_naming_the_tenant_and_its_family(cases, family, no_weight_reads, tmp_path):
    case, llama = cases[family], dense_llama()
    with pytest.raises(UnsupportedFamilyError, match=r"Tenant 'dense' is a 'llama' model, which is not a supported MoE"):
        multimoe.from_models({"zeta": case.originals["zeta"], "dense": llama})
    llama.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedFamilyError, match=r"Tenant 'dense' \(.*\) is a 'llama' model, which is not a supp"):
        multimoe.from_models({"zeta": case.sources["default"]["zeta"], "dense": tmp_path})


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_a_family_class_refuses_sources_of_another_family(cases, family, no_weight_reads):
    model_class = getattr(multimoe, f"MultiTenant{STEMS[family]}ForCausalLM")
    other = cases[other_family(family)]
    message = (rf"Tenant 'a' is a '{other.family}' model; this class serves '{family}' tenants "
               r"\(multimoe.from_models picks the class from the sources\)")
    with pytest.raises(IncompatibleTenantsError, match=message):
        model_class.from_models({"a": other.originals["zeta"], "b": other.originals["alpha"]})
    with pytest.raises(IncompatibleTenantsError, match=message):
        model_class.from_models({"a": other.sources["fused"]["zeta"]})


@pytest.mark.parametrize("method", ["bitsandbytes", "gptq"])
@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_a_quantized_source_is_refused_naming_the_quantization(cases, family, method, no_weight_reads, tmp_path):
    """A quantization transformers cannot dequantize on load (MXFP4 and FP8 it can: see
    test_quantized_sources.py) is refused from config.json alone, naming it."""
    case = cases[family]
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    for file in case.sources["default"]["alpha"].iterdir():
        (quantized / file.name).write_bytes(file.read_bytes())
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"Tenant 'q': its weights are quantized \({method}\)"):
        multimoe.from_models({"zeta": case.sources["default"]["zeta"], "q": quantized})


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_a_loaded_model_still_quantized_is_refused_naming_the_quantization(cases, family, no_weight_reads, monkeypatch):
    loaded = random_model(tiny_config(family), seed=3)
    loaded.config.quantization_config = {"quant_method": "fp8"}
    monkeypatch.setattr(loaded, "is_quantized", True, raising=False)
    with pytest.raises(CheckpointError, match=r"Tenant 'q': its weights are quantized \(fp8\)"):
        multimoe.from_models({"zeta": cases[family].originals["zeta"], "q": loaded})


# -- mixed batches in every cache, training, and what tenants may keep for themselves --------------------------


def test_gpt_oss_mixed_batch_with_a_static_cache_generates_each_tenants_tokens(cases, inputs):
    """gpt-oss's attention (sinks) runs per tenant group over a per-group view of the cache; a static
    cache advances its write position in a tensor, which each group's view must not move."""
    case = cases["gpt_oss"]
    options = dict(GREEDY, cache_implementation="static")
    output = case.multi.generate(**inputs, tenant_names=MIXED_ROWS, **options)
    for row, name in enumerate(MIXED_ROWS):
        own = case.originals[name].generate(**inputs, **options)
        assert torch.equal(output[row], own[row]), (row, name)


def test_gradient_checkpointing_replays_a_mixed_batch_with_its_routing(cases, inputs):
    """The backward pass replays each checkpointed layer outside the call; a mixed batch's layer must
    get its rows' tenants back, and its gradients equal those of the tenants' own models."""
    case = cases["qwen3_moe"]
    model = multimoe.from_models(dict(case.originals))
    model.gradient_checkpointing_enable()
    model.train()
    calls = []
    projection = model.model.layers[0].tenants["alpha"].self_attn.q_proj
    projection.register_forward_hook(lambda module, args, output: calls.append(1))
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model(**inputs, labels=labels, tenant_names=MIXED_ROWS).loss.backward()
    assert len(calls) == 2  # the forward and its replay
    for name in NAMES:
        own = copy.deepcopy(case.originals[name]).train()
        rows = [row for row, tenant in enumerate(MIXED_ROWS) if tenant == name]
        own(**{key: value[rows] for key, value in inputs.items()}, labels=labels[rows]).loss.backward()
        ours = model.model.layers[0].tenants[name].self_attn.q_proj.weight.grad
        theirs = own.model.layers[0].self_attn.q_proj.weight.grad
        # The mixed loss averages over every row's tokens, each model's over its own rows' tokens.
        tokens = (labels[:, 1:] != -100).sum()
        own_tokens = (labels[rows, 1:] != -100).sum()
        assert_close(ours * tokens / own_tokens, theirs, name)


def test_each_tenant_keeps_its_own_padding_token(cases):
    case = cases["olmoe"]
    other = copy.deepcopy(case.originals["alpha"])
    other.config.pad_token_id = 3
    other.model.embed_tokens.padding_idx = 3
    model = multimoe.from_models({"zeta": case.originals["zeta"], "alpha": other})
    assert model.model.embed_tokens["zeta"].padding_idx == 0
    assert model.model.embed_tokens["alpha"].padding_idx == 3
    assert model.config.tenants["alpha"]["pad_token_id"] == 3


def test_max_position_embeddings_must_agree_when_the_rope_reads_it(cases):
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    short = random_model(tiny_config("qwen3_moe", rope_parameters=rope, max_position_embeddings=16), seed=1)
    long = random_model(tiny_config("qwen3_moe", rope_parameters=rope), seed=2)
    with pytest.raises(IncompatibleTenantsError, match="max_position_embeddings is 16 in 'short' but 128 in 'long'"):
        multimoe.from_models({"short": short, "long": long})
    # With the default rope it only bounds the inputs: tenants keep their own, the model the largest.
    default_short = copy.deepcopy(cases["qwen3_moe"].originals["zeta"])
    default_short.config.max_position_embeddings = 16
    model = multimoe.from_models({"short": default_short, "long": cases["qwen3_moe"].originals["alpha"]})
    assert model.config.max_position_embeddings == 128


def test_fields_no_family_reads_do_not_make_tenants_incompatible(cases):
    case = cases["qwen3_moe"]
    other = copy.deepcopy(case.originals["alpha"])
    other.config.max_window_layers, other.config.pretraining_tp = 7, 2
    model = multimoe.from_models({"zeta": case.originals["zeta"], "alpha": other})
    assert model.tenants == NAMES


def test_a_module_reading_its_childs_weight_runs_whole_per_tenant_group(inputs):
    """HunYuan's router reads `self.wg.weight` instead of calling `wg`: in a mixed batch the router
    runs whole per tenant group (a stand-in for `wg` could only offer one tenant's weight)."""
    multimoe.register_family(multimoe.Family("hunyuan_v1_moe"))
    config = AutoConfig.for_model(
        "hunyuan_v1_moe", vocab_size=47, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, moe_topk=2, initializer_range=0.2,
    )
    base = random_model(config, seed=0)
    originals = {"zeta": fine_tune(base, seed=1, changed_experts=[0]), "alpha": fine_tune(base, seed=2, changed_experts=[1])}
    model = multimoe.from_models(originals).eval()
    assert type(model.model.layers[0].mixed.mlp.gate).__name__ == "RowDispatch"
    mixed = logits(model, inputs, tenant_names=MIXED_ROWS)
    for row, name in enumerate(MIXED_ROWS):
        assert_close(mixed[row], logits(originals[name], inputs)[row], f"row {row} ({name})")
