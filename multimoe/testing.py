"""Tiny Mixtral tenants and a character tokenizer made on the fly, for tests, examples and benchmarks.

Nothing here downloads anything: every model is built from a seed, so anyone can rerun a figure.
"""

from __future__ import annotations

import copy
import string
from collections.abc import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = list(string.ascii_lowercase + string.digits + " .,?!+=")


def tiny_mixtral_config(**overrides) -> MixtralConfig:
    """A Mixtral small enough for a unit test; any `MixtralConfig` field can be overridden."""
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


def random_mixtral(config: MixtralConfig, seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).eval()


def fine_tune(
    base: MixtralForCausalLM, *, seed: int, changed_experts: Iterable[int], scale: float = 0.05
) -> MixtralForCausalLM:
    """A stand-in for a full fine-tune of `base`: every non-expert tensor moves, and so do the
    experts listed in `changed_experts` (in every layer); the other experts stay bit-identical."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.tensor(sorted(set(changed_experts)), dtype=torch.long)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            noise = scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            if ".mlp.experts." in name:
                parameter[rows] += noise[rows]
            else:
                parameter += noise
    return tuned.eval()


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


__all__ = ["character_tokenizer", "fine_tune", "random_mixtral", "tiny_mixtral_config"]
