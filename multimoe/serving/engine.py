"""A running batch of requests: prefill and decode with one KV cache, rows joining and leaving.

This is the smallest engine that continuous batching needs: new requests are prefilled on their
own, then their cache rows are left-padded to the batch's length and appended; finished rows are
dropped. Positions follow the attention mask, so padding never shifts a row's rotary phase. Rows
are kept grouped by tenant, so a mixed batch runs each tenant's rows as a slice, with no gathering.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from ..generation import eos_ids, positions_from_mask
from ..routing import tenant_order
from .trace import Request

# Forward keyword arguments for a batch whose rows belong to these tenants (see backends.py).
Prepare = Callable[[Sequence[str]], dict]


def cache_from_layers(config, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache(config=config)
    for layer_idx, (keys, values) in enumerate(layers):
        cache.update(keys, values, layer_idx)
    return cache


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def sampling_generator(request: Request, device: torch.device) -> torch.Generator | None:
    """A sampled row's own generator when it has a seed; None draws from torch's global one."""
    if request.temperature == 0 or request.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(request.seed)


def pick_token(logits: torch.Tensor, request: Request, generator: torch.Generator | None) -> int:
    """One row's next token from its logits [V]: greedy, or sampled as `request` asks."""
    if request.temperature == 0:
        return int(logits.argmax())
    logits = logits.float()
    # Shifted so that the largest is 0: a tiny temperature cannot overflow to inf (and NaN).
    probabilities = torch.softmax((logits - logits.max()) / request.temperature, dim=-1)
    if request.top_p < 1:
        ordered, order = probabilities.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always).
        outside = ordered.cumsum(-1) - ordered >= request.top_p
        probabilities = probabilities.scatter(-1, order, ordered.masked_fill(outside, 0))
    return int(torch.multinomial(probabilities, 1, generator=generator))


@dataclass
class RunningBatch:
    """Rows in flight: their requests, last token, attention mask, cache, tokens produced, sampling
    generators, and why each row finished (None while it runs; else "length" or "stop")."""

    requests: list[Request]
    last_tokens: torch.Tensor  # [rows, 1]
    attention_mask: torch.Tensor  # [rows, length]
    cache: DynamicCache
    tokens: list[list[int]]
    generators: list[torch.Generator | None]
    finish_reasons: list[str | None]

    @property
    def tenants(self) -> list[str]:
        return [request.tenant for request in self.requests]

    def finished_rows(self) -> list[int]:
        return [row for row, reason in enumerate(self.finish_reasons) if reason is not None]

    def keep(self, rows: list[int], config) -> RunningBatch | None:
        """The batch of `rows` alone, without the leading positions that are padding in all of them
        (left by the longer rows that left): a server that stays busy would otherwise grow its
        cache, and each step's work, for as long as it runs."""
        if not rows:
            return None
        index = torch.tensor(rows, device=self.last_tokens.device)
        mask = self.attention_mask.index_select(0, index)
        length = mask.shape[1] - int(mask.any(0).int().argmax())  # from the first position any row uses

        def kept(tensor: torch.Tensor) -> torch.Tensor:  # a sliding-window layer keeps fewer positions
            return tensor.index_select(0, index)[:, :, -min(length, tensor.shape[2]):]

        layers = [(kept(keys), kept(values)) for keys, values in cache_layers(self.cache)]
        return RunningBatch(
            [self.requests[row] for row in rows],
            self.last_tokens.index_select(0, index),
            mask[:, -length:],
            cache_from_layers(config, layers),
            [self.tokens[row] for row in rows],
            [self.generators[row] for row in rows],
            [self.finish_reasons[row] for row in rows],
        )

    def merge(self, other: RunningBatch, config) -> RunningBatch:
        """Append `other`'s rows, left-padding whichever side is shorter, then regroup by tenant."""
        length = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        layers = [
            (
                torch.cat([left_pad(k1, length, 2), left_pad(k2, length, 2)]),
                torch.cat([left_pad(v1, length, 2), left_pad(v2, length, 2)]),
            )
            for (k1, v1), (k2, v2) in zip(cache_layers(self.cache), cache_layers(other.cache))
        ]
        merged = RunningBatch(
            self.requests + other.requests,
            torch.cat([self.last_tokens, other.last_tokens]),
            torch.cat([left_pad(self.attention_mask, length, 1), left_pad(other.attention_mask, length, 1)]),
            cache_from_layers(config, layers),
            self.tokens + other.tokens,
            self.generators + other.generators,
            self.finish_reasons + other.finish_reasons,
        )
        order = tenant_order(merged.tenants)
        return merged if order == list(range(len(order))) else merged.keep(order, config)


class Engine:
    """Generation on one model for batches of requests, each row decoding and stopping as its
    request asks (see `Request`), at its own tenant's EOS."""

    def __init__(
        self,
        model,
        tokenizer: PreTrainedTokenizerBase,
        prepare: Prepare,
        tenant_tokenizers: Mapping[str, PreTrainedTokenizerBase] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.prepare = prepare
        self.tenant_tokenizers = dict(tenant_tokenizers or {})

    def tokenizer_of(self, tenant: str) -> PreTrainedTokenizerBase:
        """The tenant's own tokenizer where it has one (fine-tunes may add special tokens), else
        the shared one."""
        return self.tenant_tokenizers.get(tenant, self.tokenizer)

    def prompt_ids(self, request: Request) -> list[int]:
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        return self.tokenizer_of(request.tenant)(request.prompt)["input_ids"]

    def eos_ids(self, tenant: str) -> list[int]:
        """The tenant's own EOS tokens (a multi-tenant model keeps a generation config per tenant;
        a plain model, one for all)."""
        configs = getattr(self.model, "generation_configs", None)
        return eos_ids(configs[tenant] if configs else self.model.generation_config)

    def text(self, batch: RunningBatch, row: int) -> str:
        """The row's completion: its tokens decoded without special tokens, cut before the first
        stop string it contains."""
        text = self.decoded(batch.requests[row], batch.tokens[row])
        cuts = [text.find(stop) for stop in batch.requests[row].stop if stop in text]
        return text[: min(cuts)] if cuts else text

    def decoded(self, request: Request, tokens: list[int]) -> str:
        """The tokens' text. Without the cleanup of spaces before punctuation, which rewrites text
        already sent: decoding a prefix of the tokens then gives a prefix of the text, and a stream
        equals the whole answer."""
        tokenizer = self.tokenizer_of(request.tenant)
        return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def finish_reason(self, request: Request, tokens: list[int]) -> str | None:
        if not request.ignore_eos and tokens[-1] in self.eos_ids(request.tenant):
            return "stop"
        if request.stop:
            text = self.decoded(request, tokens)
            if any(stop in text for stop in request.stop):
                return "stop"
        return "length" if len(tokens) >= request.max_new_tokens else None

    def advance(self, batch: RunningBatch, logits: torch.Tensor) -> None:
        """Append each running row's next token from `logits` [rows, V] and mark the rows that
        finish; a finished row keeps its place, fed its last token, until the caller drops it."""
        for row, request in enumerate(batch.requests):
            if batch.finish_reasons[row] is None:
                batch.tokens[row].append(pick_token(logits[row], request, batch.generators[row]))
                batch.finish_reasons[row] = self.finish_reason(request, batch.tokens[row])
        batch.last_tokens = torch.tensor([tokens[-1] for tokens in batch.tokens], device=logits.device).unsqueeze(-1)

    @torch.inference_mode()
    def prefill(self, requests: Sequence[Request]) -> RunningBatch:
        """Run the prompts (grouped by tenant, each tokenized by its tenant's tokenizer) and pick each
        row's first token. Padding goes on the left whatever a tokenizer's `padding_side`: every
        row's first token is read at the last position, and rows join a running batch by
        left-padding."""
        if not requests:
            raise ValueError("prefill needs at least one request.")
        requests = [requests[row] for row in tenant_order([request.tenant for request in requests])]
        prompts = [self.prompt_ids(request) for request in requests]
        device = self.model.device
        width = max(map(len, prompts))
        input_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
        positions = positions_from_mask(mask)
        routing = self.prepare([r.tenant for r in requests])
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=DynamicCache(config=self.model.config),
            use_cache=True,
            logits_to_keep=1,
            **routing,
        )
        batch = RunningBatch(
            list(requests), None, mask, out.cache, [[] for _ in requests],
            [sampling_generator(request, mask.device) for request in requests], [None] * len(requests),
        )
        self.advance(batch, out.logits[:, -1])
        return batch

    @torch.inference_mode()
    def decode(self, batch: RunningBatch) -> RunningBatch:
        """One step for every row."""
        mask = torch.cat([batch.attention_mask, torch.ones_like(batch.attention_mask[:, :1])], dim=1)
        routing = self.prepare(batch.tenants)
        out = self.model(
            input_ids=batch.last_tokens,
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            cache=batch.cache,
            use_cache=True,
            **routing,
        )
        batch.attention_mask = mask
        batch.cache = out.cache
        self.advance(batch, out.logits[:, -1])
        return batch


__all__ = ["Engine", "RunningBatch"]
