"""Tiny Mixtral tenants and a character tokenizer, made on the fly with fixed seeds."""

from __future__ import annotations

import copy
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = list(string.ascii_lowercase + string.digits + " .,?!")


def tiny_config(**overrides) -> MixtralConfig:
    fields = dict(
        vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return MixtralConfig(**fields | overrides)


def fine_tune(base: MixtralForCausalLM, seed: int, changed_experts: set[int]) -> MixtralForCausalLM:
    """A full fine-tune: every non-expert tensor moves, and so do the experts in `changed_experts`."""
    generator = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            noise = 0.05 * torch.randn(parameter.shape, generator=generator)
            if ".mlp.experts." in name:
                rows = torch.tensor(sorted(changed_experts))
                parameter[rows] += noise[rows]
            else:
                parameter += noise
    return tuned.eval()


def build_tenants() -> dict[str, MixtralForCausalLM]:
    torch.manual_seed(0)
    base = MixtralForCausalLM(tiny_config()).eval()
    tied = MixtralForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for layer, base_layer in zip(tied.model.layers, base.model.layers):
            layer.mlp.experts.gate_up_proj[:2] = base_layer.mlp.experts.gate_up_proj[:2]
            layer.mlp.experts.down_proj[:2] = base_layer.mlp.experts.down_proj[:2]
    return {
        "base": base,
        "chat": fine_tune(base, seed=1, changed_experts={0, 1}),
        "code": fine_tune(base, seed=2, changed_experts={1, 3}),
        "tied": tied,
    }


def build_tokenizer() -> PreTrainedTokenizerFast:
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
