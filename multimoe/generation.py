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


def settings(config: GenerationConfig) -> dict:
    return {key: value for key, value in config.to_dict().items() if key not in METADATA_FIELDS}


def generation_for_rows(
    configs: Mapping[str, GenerationConfig], row_tenants: Sequence[str], given: Mapping[str, object]
) -> tuple[GenerationConfig, StoppingCriteriaList]:
    """The generation config and extra stopping criteria for a batch whose rows run as
    `row_tenants`, when the caller passed `given` as generation keyword arguments."""
    present = list(dict.fromkeys(row_tenants))
    config = copy.deepcopy(configs[present[0]])
    if len(present) == 1:
        return config, StoppingCriteriaList()
    first, others = settings(configs[present[0]]), [settings(configs[name]) for name in present[1:]]
    differing = sorted(
        key for key in first if key not in given and key != "eos_token_id" and any(o[key] != first[key] for o in others)
    )
    if differing:
        raise ValueError(
            f"The tenants of this batch ({present}) have different generation settings {differing}; pass the value "
            "to use for the whole batch, e.g. generate(..., " + ", ".join(f"{key}=..." for key in differing) + ")."
        )
    per_tenant_eos = {name: eos_ids(configs[name]) for name in present}
    if "eos_token_id" in given or len({tuple(tokens) for tokens in per_tenant_eos.values()}) == 1:
        return config, StoppingCriteriaList()
    if (given.get("num_beams") or config.num_beams or 1) > 1:
        raise ValueError(
            f"The tenants of this batch stop at different EOS tokens ({per_tenant_eos}), which beam search cannot "
            "apply per row; pass eos_token_id= for the whole batch, or run each tenant's rows in their own call."
        )
    config.eos_token_id = None
    return config, StoppingCriteriaList([TenantEosCriteria([per_tenant_eos[name] for name in row_tenants])])


__all__ = ["TenantEosCriteria", "generation_for_rows"]
