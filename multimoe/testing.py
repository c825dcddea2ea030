"""Tiny tenants of every supported family and a character tokenizer, made on the fly, for tests,
examples and benchmarks.

Nothing here downloads anything: every model is built from a seed, so anyone can rerun a figure.
"""

from __future__ import annotations

import copy
import string
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, MixtralConfig, MixtralForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers import PreTrainedTokenizerFast

from .families import FAMILIES, routed_experts

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = list(string.ascii_lowercase + string.digits + " .,?!+=")


def tiny_mixtral_config(**overrides) -> MixtralConfig:
    """A Mixtral small enough for a unit test; any `MixtralConfig` field can be overridden."""
    return tiny_config("mixtral", **overrides)


def random_mixtral(config: MixtralConfig, seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).eval()


# Per family, the fields that make its default config tiny and exercise what sets it apart: dense
# layers, shared experts and their gates, grouped bias-corrected routing, latent attention, sinks
# and alternating sliding-window layers.
TINY_FIELDS = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4),
    "qwen2_moe": dict(
        intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
        num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_hidden_layers=3, mlp_only_layers=[1],
        head_dim=8, norm_topk_prob=True,
    ),
    "olmoe": dict(intermediate_size=24, num_experts=4),
    "deepseek_v3": dict(
        intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3, first_k_dense_replace=1,
        n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8,
        v_head_dim=8,
    ),
    "gpt_oss": dict(intermediate_size=16, num_local_experts=4, head_dim=8, sliding_window=4),
}
# Switch Transformers names its fields its own way; every other block is sparse, in both stacks.
SWITCH_FIELDS = dict(
    vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS), d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
    num_decoder_layers=2, num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=64,
    relative_attention_num_buckets=8, relative_attention_max_distance=16, initializer_factor=1.0,
    pad_token_id=0, decoder_start_token_id=0, bos_token_id=1, eos_token_id=2,
)


def tiny_config(model_type: str, **overrides) -> PreTrainedConfig:
    """A config of `model_type` small enough for a unit test (any field can be overridden)."""
    if model_type == "switch_transformers":
        return AutoConfig.for_model(model_type, **SWITCH_FIELDS | overrides)
    fields = dict(
        vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return AutoConfig.for_model(model_type, **fields | TINY_FIELDS[model_type] | overrides)


def random_model(config: PreTrainedConfig, seed: int = 0) -> PreTrainedModel:
    """The family's own model with random weights; persistent float buffers (such as DeepSeek's
    router bias) are randomised too, so that every per-tenant tensor matters."""
    torch.manual_seed(seed)
    model = FAMILIES[config.model_type].model_class(config).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point() and name in model.state_dict():
                buffer.normal_(0.0, config.initializer_range)
    return model


def fine_tune(
    base: PreTrainedModel, *, seed: int, changed_experts: Iterable[int], scale: float = 0.05
) -> PreTrainedModel:
    """A stand-in for a full fine-tune of `base`: every non-expert tensor moves, and so do the
    experts listed in `changed_experts` (in every sparse layer); the other experts stay bit-identical."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.tensor(sorted(set(changed_experts)), dtype=torch.long)
    family, config = FAMILIES[base.config.model_type], base.config
    # A per-expert family stores each expert's tensors apart: those of the changed entries move whole.
    entries = family.entry_names(config, routed_experts(config)) if family.per_expert_modules else []
    changed = [f".{entries[index]}." for index in rows.tolist()] if entries else []
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, tensor in tuned.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = scale * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            if not family.is_expert_key(name):
                tensor += noise
            elif not family.per_expert_modules:
                tensor[rows] += noise[rows]
            elif any(entry in name for entry in changed):
                tensor += noise
    return tuned.eval()


def load_offloaded(model_class: type[PreTrainedModel], directory, *, max_cpu_bytes: int, offload_folder):
    """`model_class.from_pretrained(directory)` split by accelerate between the CPU (at most
    `max_cpu_bytes`) and disk, after checking that the split reaches the disk and keeps every
    decoder layer (its pool and every tenant's share) whole."""
    model = model_class.from_pretrained(
        directory, device_map="auto", max_memory={"cpu": max_cpu_bytes}, offload_folder=offload_folder
    ).eval()
    placements = model.hf_device_map
    assert {"cpu", "disk"} <= set(placements.values()), placements
    for module in placements:
        if module.startswith("model.layers."):
            assert module.count(".") == 2, f"{module}: a decoder layer (pool + its tenants) must not be split"
    return model


def character_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, left padding; ids match `tiny_mixtral_config`'s vocabulary."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def run_without_multimoe(script: str, *args: str, workdir: Path) -> subprocess.CompletedProcess:
    """Run `python -c script *args` in a fresh process that sees an empty environment (no HOME
    caches, remote code cached under `workdir`) with this process's thread count, so that its
    kernels round alike: how a checkpoint loads by remote code where multimoe is not installed
    (`script` hides it itself, e.g. `sys.modules["multimoe"] = None`). Fails with its stderr."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=workdir,
        env={"HF_MODULES_CACHE": str(Path(workdir) / "modules"), "PATH": "/usr/bin:/bin", "HOME": str(workdir),
             "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    if result.returncode:
        raise AssertionError(f"the isolated process failed:\n{result.stderr[-3000:]}")
    return result


__all__ = [
    "character_tokenizer", "load_offloaded", "fine_tune", "random_mixtral", "random_model", "run_without_multimoe",
    "tiny_config", "tiny_mixtral_config",
]
