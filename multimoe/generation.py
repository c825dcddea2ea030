"""Each tenant's own generation settings, for one-tenant calls and for mixed-tenant batches.

Fine-tunes differ in their EOS tokens and generation defaults. A call that runs one tenant uses
that tenant's generation config, as its original model would. A mixed batch runs one `generate`
loop for every row, so its settings must be one: each row stops at its own tenant's EOS, and any
other setting in which the batch's tenants differ must be given by the caller (it is refused
rather than taken from one tenant).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

# Bookkeeping, not settings.
METADATA_FIELDS = {"transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash"}


def eos_ids(config: GenerationConfig) -> list[int]:
    """A config's EOS tokens as a list (it may hold None, one int, a list or a tensor)."""
    eos = config.eos_token_id
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    return [int(token) for token in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


class TenantEosCriteria(StoppingCriteria):
    """Stops each row at its own tenant's EOS tokens. Its `eos_token_id` (the union) marks it as an
    EOS criterion for transformers, which then pads the rows that finished."""

    def __init__(self, row_eos: Sequence[Sequence[int]]):
        width = max(len(tokens) for tokens in row_eos)
        self.table = torch.tensor([list(tokens) + [-1] * (width - len(tokens)) for tokens in row_eos])
        self.eos_token_id = torch.tensor(sorted({token for tokens in row_eos for token in tokens}))

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        table = self.table.to(input_ids.device)
        # generate() expands each row into its beams / return sequences, consecutively.
        table = table.repeat_interleave(input_ids.shape[0] // table.shape[0], dim=0)
        return (input_ids[:, -1:] == table).any(dim=-1)


def comparable_settings(config: GenerationConfig) -> dict:
    return {key: value for key, value in config.to_dict().items() if key not in METADATA_FIELDS}


# A setting the caller gives also decides these: `max_new_tokens` replaces `max_length`.
COVERS = {"max_new_tokens": "max_length", "min_new_tokens": "min_length"}
# What transformers applies through the one EOS of the generation config, so not per row.
EOS_BOUND = ("min_length", "min_new_tokens", "exponential_decay_length_penalty")
UNSET = object()


def generation_for_rows(
    configs: Mapping[str, GenerationConfig], row_tenants: Sequence[str], given: Mapping[str, object]
) -> tuple[GenerationConfig, StoppingCriteriaList]:
    """The generation config and extra stopping criteria for a batch whose rows run as
    `row_tenants`, when the caller gave the generation settings `given`."""
    present = list(dict.fromkeys(row_tenants))
    config = copy.deepcopy(configs[present[0]])
    if len(present) == 1:
        return config, StoppingCriteriaList()
    tenants = [comparable_settings(configs[name]) for name in present]
    decided = set(given) | {COVERS[key] for key in given if key in COVERS} | {"eos_token_id"}
    differing = sorted(
        key
        for key in set().union(*tenants) - decided
        if any(settings.get(key, UNSET) != tenants[0].get(key, UNSET) for settings in tenants[1:])
    )
    if differing:
        raise ValueError(
            f"The tenants of this batch ({present}) have different generation settings {differing}; pass the value "
            "to use for the whole batch, e.g. generate(..., " + ", ".join(f"{key}=..." for key in differing) + ")."
        )
    per_tenant_eos = {name: eos_ids(configs[name]) for name in present}
    if "eos_token_id" in given or len({tuple(tokens) for tokens in per_tenant_eos.values()}) == 1:
        return config, StoppingCriteriaList()
    refused = [key for key in EOS_BOUND if given.get(key, getattr(config, key, None)) not in (None, 0)]
    if (given.get("num_beams") or config.num_beams or 1) > 1:
        refused.insert(0, "num_beams")
    if refused:
        raise ValueError(
            f"The tenants of this batch stop at different EOS tokens ({per_tenant_eos}), which {refused} cannot apply "
            "per row (transformers applies them through one EOS); pass eos_token_id= for the whole batch, or run "
            "each tenant's rows in their own call."
        )
    if given.get("pad_token_id", config.pad_token_id) is None:
        # What transformers pads finished rows with when no pad token is set: an EOS token.
        config.pad_token_id = next(token for tokens in per_tenant_eos.values() for token in tokens)
    config.eos_token_id = None
    return config, StoppingCriteriaList([TenantEosCriteria([per_tenant_eos[name] for name in row_tenants])])


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token, as `generate` gives them: a
    left-padded row sees the positions it would see alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


__all__ = ["TenantEosCriteria", "generation_for_rows", "positions_from_mask"]
