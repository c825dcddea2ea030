"""Calibration: run each original tenant on the calibration tokens, one decoder layer of one tenant
at a time (`streaming.py`), so that no source model is ever held whole.

Collected per tenant: its mean language-model loss (the quality guard's baseline), how often its
router picks each expert (for usage-weighted merging), and a sample of the hidden states that
reach each layer's experts (for output-based similarity).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from transformers import PreTrainedModel

from ..assembly import TenantSet
from ..families import Family
from .streaming import LayerByLayerModel

BATCH_ROWS = 8
PAIR_KEYS = {"prompt", "completion"}
# A text, a prompt/completion pair, or token ids; calibration is one of them or a sequence of them.
CalibrationSample = Union[str, Mapping[str, str], Sequence[int], torch.Tensor]
CalibrationInput = Union[CalibrationSample, Sequence[CalibrationSample]]


@dataclass(frozen=True)
class CalibrationData:
    """Left-padded calibration rows; `labels` score every real token, or only the completion of
    prompt/completion pairs (padding and prompts are -100). For an encoder-decoder model the rows
    are the prompts, and `labels` the completions, right-padded with -100."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def pairs_for_encoder_decoder(cls, calibration: CalibrationInput, tokenizer: Callable | None, pad_token_id: int = 0) -> CalibrationData:
        """`{"prompt", "completion"}` pairs for an encoder-decoder model: the prompt is the
        encoder's input and the completion (with the tokenizer's end token) the scored target."""
        samples = [calibration] if isinstance(calibration, Mapping) else calibration
        if not isinstance(samples, Sequence) or isinstance(samples, str) or not all(
            isinstance(sample, Mapping) and set(sample) == PAIR_KEYS for sample in samples
        ):
            raise ValueError(
                "An encoder-decoder model is calibrated on {'prompt': ..., 'completion': ...} pairs (the prompt goes "
                "to the encoder, the completion is scored), not on texts or token ids."
            )
        prompts = [cls.tokenize(sample["prompt"], tokenizer) for sample in samples]
        targets = [cls.tokenize(sample["completion"], tokenizer) for sample in samples]
        if not samples or not all(prompts) or not all(targets):
            raise ValueError("Calibration data is empty: give pairs with a non-empty prompt and completion.")
        input_ids = torch.full((len(samples), max(map(len, prompts))), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full((len(samples), max(map(len, targets))), -100, dtype=torch.long)
        for index, (prompt, target) in enumerate(zip(prompts, targets)):
            input_ids[index, input_ids.shape[1] - len(prompt) :] = torch.tensor(prompt)
            attention_mask[index, input_ids.shape[1] - len(prompt) :] = 1
            labels[index, : len(target)] = torch.tensor(target)
        return cls(input_ids, attention_mask, labels)

    @classmethod
    def from_user(cls, calibration: CalibrationInput, tokenizer: Callable | None = None, pad_token_id: int = 0) -> CalibrationData:
        """Texts (needs `tokenizer`), `{"prompt": ..., "completion": ...}` pairs (TRL's
        prompt-completion format: only the completion is scored, as a fine-tune is judged on its
        answers), lists of token ids, or a 2-D tensor of token ids."""
        if isinstance(calibration, torch.Tensor):
            calibration = list(calibration.reshape(-1, calibration.shape[-1]))
        elif isinstance(calibration, (str, Mapping)):
            calibration = [calibration]
        if not isinstance(calibration, Sequence):
            raise ValueError(f"calibration must be texts, prompt/completion pairs or token ids, got {type(calibration).__name__}.")
        rows = [cls.scored_row(sample, tokenizer) for sample in calibration]
        rows = [(row, start) for row, start in rows if len(row) >= 2 and start < len(row)]
        if not rows:
            raise ValueError(
                "Calibration data is empty: give texts or token ids with at least two tokens each (pairs with a "
                "non-empty completion)."
            )
        length = max(len(row) for row, _ in rows)
        input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for index, (row, start) in enumerate(rows):
            input_ids[index, length - len(row) :] = torch.tensor(row)
            attention_mask[index, length - len(row) :] = 1
            labels[index, length - len(row) + start :] = torch.tensor(row[start:])
        return cls(input_ids, attention_mask, labels)

    @staticmethod
    def scored_row(sample: CalibrationSample, tokenizer: Callable | None) -> tuple[list[int], int]:
        """Token ids of one sample and the index of its first scored token."""
        if isinstance(sample, str):
            return CalibrationData.tokenize(sample, tokenizer), 0
        if isinstance(sample, torch.Tensor):
            return sample.flatten().tolist(), 0
        if isinstance(sample, Mapping):
            if set(sample) != PAIR_KEYS:
                raise ValueError(f"A calibration pair needs exactly the keys 'prompt' and 'completion', got {sorted(sample)}.")
            if not all(isinstance(sample[key], str) for key in PAIR_KEYS):
                raise ValueError("A calibration pair holds two strings (conversational message lists are not supported).")
            prompt = CalibrationData.tokenize(sample["prompt"], tokenizer)
            full = CalibrationData.tokenize(sample["prompt"] + sample["completion"], tokenizer)
            # Scoring starts where the two tokenizations part: robust to an appended EOS and to
            # tokens that merge across the prompt/completion boundary.
            shared = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
            return full, shared
        if isinstance(sample, Sequence) and all(isinstance(token, int) for token in sample):
            return list(sample), 0
        raise ValueError(f"A calibration sample must be a text, a prompt/completion pair or token ids, got {sample!r:.80}.")

    @staticmethod
    def tokenize(text: str, tokenizer: Callable | None) -> list[int]:
        if tokenizer is None:
            raise ValueError("Calibration texts need a tokenizer (pass tokenizer=...).")
        return tokenizer(text)["input_ids"]

    def batches(self):
        for start in range(0, self.input_ids.shape[0], BATCH_ROWS):
            rows = slice(start, start + BATCH_ROWS)
            yield self.input_ids[rows], self.attention_mask[rows], self.labels[rows]


def per_tenant_data(
    calibration, tenants: Sequence[str], tokenizer=None, encoder_decoder: bool = False
) -> dict[str, CalibrationData]:
    """Each tenant's calibration rows: its own entry when `calibration` maps tenant names to data
    (a tenant is then measured on what it serves), else the same data for all."""
    read = CalibrationData.pairs_for_encoder_decoder if encoder_decoder else CalibrationData.from_user
    if isinstance(calibration, Mapping) and set(calibration) != PAIR_KEYS:
        missing = [name for name in tenants if name not in calibration]
        if missing or len(calibration) != len(tenants):
            raise ValueError(f"Per-tenant calibration must name exactly the tenants {list(tenants)}; got {list(calibration)}.")
        return {name: read(calibration[name], tokenizer) for name in tenants}
    shared = read(calibration, tokenizer)
    return dict.fromkeys(tenants, shared)


@dataclass
class CalibrationStats:
    losses: dict[str, float]  # tenant -> mean loss of its original model on its calibration data
    usage: dict[str, torch.Tensor]  # tenant -> [L, E] router picks
    layer_inputs: dict[str, list[torch.Tensor]]  # tenant -> per layer, sampled inputs of its experts [n, H]


@torch.no_grad()
def language_model_loss(model, data: CalibrationData, **forward_kwargs) -> float:
    """Token-weighted mean loss over the calibration rows."""
    total, tokens = 0.0, 0
    shift = 0 if model.config.is_encoder_decoder else 1  # a causal LM scores each label from the token before
    for input_ids, attention_mask, labels in data.batches():
        count = int((labels[:, shift:] != -100).sum())
        # The language-model loss alone, even where a config asks for router logits: their
        # load-balancing term measures no quality (and a model run layer by layer has none to add).
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        loss = model(**batch, output_router_logits=False, **forward_kwargs).loss
        total += float(loss) * count
        tokens += count
    return total / tokens


class ExpertCalls:
    """What a tenant's model calls its experts with, per layer: how often its router picks each
    expert, and the hidden states that reach them (a prompt's real tokens, and in a decoder the
    scored targets). Recorded by hooks on `model`, which this object does not keep."""

    def __init__(self, model: PreTrainedModel, family: Family, num_experts: int):
        paths = family.experts_modules(model.config)
        self.family, self.num_experts = family, num_experts
        self.counts = torch.zeros(len(paths), num_experts)
        self.inputs: list[list[torch.Tensor]] = [[] for _ in paths]
        self.valid: list[torch.Tensor] = []
        for layer_idx, path in enumerate(paths):
            if path is not None:
                stack = int(path.startswith("decoder."))
                model.get_submodule(path).register_forward_pre_hook(self.recorder(layer_idx, stack))
        model.register_forward_pre_hook(self.remember_valid_rows, with_kwargs=True)

    def remember_valid_rows(self, module, args, kwargs) -> None:
        self.valid[:] = [kwargs["attention_mask"].reshape(-1).bool(), (kwargs["labels"] != -100).reshape(-1)]

    def recorder(self, layer_idx: int, stack: int):
        def record(module, args):  # the experts' call: (hidden states, local routing, weights)
            rows = self.valid[stack]
            self.inputs[layer_idx].append(args[0].reshape(-1, args[0].shape[-1])[rows].float())
            picks = self.family.local_experts(args[1][rows])
            self.counts[layer_idx] += torch.bincount(picks, minlength=self.num_experts).float()

        return record

    def sample(self, layer_idx: int, max_rows: int, generator: torch.Generator) -> torch.Tensor | None:
        """Up to `max_rows` of the inputs layer `layer_idx`'s experts got, drawn at random; the others
        are dropped. None for a dense layer."""
        recorded, self.inputs[layer_idx] = self.inputs[layer_idx], []
        if not recorded:
            return None
        rows = torch.cat(recorded)
        return rows[torch.randperm(rows.shape[0], generator=generator)[:max_rows]]


@torch.no_grad()
def collect(
    tenants: TenantSet, data: Mapping[str, CalibrationData], max_rows_per_layer: int, seed: int = 0
) -> CalibrationStats:
    """Each tenant's statistics, from one decoder layer of one tenant at a time: a layer's expert
    inputs are sampled as soon as it has run on every chunk, so at most one layer's are ever held."""
    generator = torch.Generator().manual_seed(seed)
    experts = tenants.checkpoints[tenants.names[0]].num_experts
    losses, usage, samples = {}, {}, {}
    for name in tenants.names:
        streamed = LayerByLayerModel(tenants, name, data[name])
        calls = ExpertCalls(streamed.model, tenants.family, experts)
        samples[name] = []
        for layer_idx in range(tenants.num_layers):
            streamed.run_layer(layer_idx)
            samples[name].append(calls.sample(layer_idx, max_rows_per_layer, generator))
        losses[name] = language_model_loss(streamed.model, data[name])
        usage[name] = calls.counts
        del streamed  # before the next tenant's embeddings and head are read
    return CalibrationStats(losses, usage, samples)


__all__ = ["CalibrationData", "CalibrationStats", "ExpertCalls", "collect", "language_model_loss", "per_tenant_data"]
