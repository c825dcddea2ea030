"""The subset that runs on a GPU (`-m device`, `MULTIMOE_TEST_DEVICE=cuda`, run by scripts/gpu_check.sh),
and on the CPU in every suite run.

Each tenant against its family's own class, on the device and in the dtype under test. A one-tenant
call runs the family's own kernels on the same shapes, and a mixed batch runs each tenant group in a
smaller batch, whose kernels may round otherwise, so logits are compared within a tolerance per
dtype (below; bfloat16 keeps 8 bits of mantissa), and generations token for token: greedy in both
dtypes for one tenant; for mixed rows and beams, in float32, where a near tie cannot flip a token.
"""

from __future__ import annotations

import pytest
import torch

import multimoe
from multimoe.testing import character_tokenizer, fine_tune, random_model, tiny_config

pytestmark = pytest.mark.device

# Logit tolerances (absolute and relative) per dtype, CPU and CUDA alike.
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}
FAMILIES = ["mixtral", "qwen3_moe", "gpt_oss", "switch_transformers"]
PROMPTS = ["hello there", "hi", "sort dcba", "what is 2+2?"]
ROWS = ["a", "b", "b", "a"]


def tenants(model_type: str, device: torch.device, dtype: torch.dtype, directory) -> dict:
    """Two fine-tunes, loaded as users load them: in `dtype`, onto `device` (a model cast with
    `.to(dtype)` would also cast its rotary frequencies, which loading keeps in float32)."""
    base = random_model(tiny_config(model_type), seed=0)
    originals = {"a": base, "b": fine_tune(base, seed=1, changed_experts={0, 1})}
    loaded = {}
    for name, model in originals.items():
        model.save_pretrained(directory / name)
        loaded[name] = type(model).from_pretrained(directory / name, dtype=dtype, device_map=device).eval()
    return loaded


def forward_inputs(model, batch) -> dict:
    if model.config.is_encoder_decoder:
        return dict(batch, decoder_input_ids=batch["input_ids"][:, :4].contiguous())
    return dict(batch)


@pytest.fixture(scope="module")
def tokenizer():
    return character_tokenizer()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_one_tenant_matches_the_familys_own_class(model_type, dtype, device, tokenizer, tmp_path):
    originals = tenants(model_type, device, dtype, tmp_path)
    multi = multimoe.from_models(originals).eval()
    assert multi.device.type == device.type and multi.dtype == dtype
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for name, original in originals.items():
            inputs = forward_inputs(original, batch)
            torch.testing.assert_close(multi(**inputs, tenant=name).logits, original(**inputs).logits,
                                       **TOLERANCES[dtype])
            assert torch.equal(multi.generate(**batch, tenant=name, **settings), original.generate(**batch, **settings))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_mixed_rows_and_beams_match_each_rows_original(model_type, device, tokenizer, tmp_path):
    originals = tenants(model_type, device, torch.float32, tmp_path)
    multi = multimoe.from_models(originals).eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        inputs = forward_inputs(multi, batch)
        mixed = multi(**inputs, tenant_names=ROWS).logits
        for row, name in enumerate(ROWS):
            expected = originals[name](**inputs).logits[row]
            mask = slice(None) if multi.config.is_encoder_decoder else batch["attention_mask"][row].bool()
            torch.testing.assert_close(mixed[row][mask], expected[mask], **TOLERANCES[torch.float32])
        for settings in (dict(max_new_tokens=5, do_sample=False), dict(max_new_tokens=5, do_sample=False, num_beams=2)):
            together = multi.generate(**batch, tenant_names=ROWS, pad_token_id=0, **settings)
            for row, name in enumerate(ROWS):  # the row alone, padded as in the batch
                alone = originals[name].generate(**{key: value[row : row + 1] for key, value in batch.items()},
                                                 pad_token_id=0, **settings)[0]
                # A row that ends sooner than the batch is padded after its end token.
                assert together[row, : len(alone)].tolist() == alone.tolist(), (row, name, settings)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_full_rank_deltas_reproduce_each_tenant_on_the_device(model_type, dtype, device, tokenizer, tmp_path):
    """Every expert merged into `a`'s, `b`'s restored by full-rank low-rank deltas: alone, and (in
    float32, where rounding cannot flip a near tie of the router) in a mixed batch named by
    `tenant_names` (its tenant ids made on the inputs' device), on the device."""
    originals = tenants(model_type, device, dtype, tmp_path)
    model = multimoe.consolidate(originals, threshold=float("inf"), grouping="same_index", merge="keep_anchor",
                                 delta_rank=10_000, progress=False).to(device).eval()
    assert model.memory_report().delta_bytes > 0
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        mixed = model(**forward_inputs(model, batch), tenant_names=ROWS).logits
        for name, original in originals.items():
            expected = original(**forward_inputs(original, batch)).logits
            torch.testing.assert_close(model(**forward_inputs(model, batch), tenant=name).logits, expected,
                                       **TOLERANCES[dtype])
            rows = [row for row, tenant in enumerate(ROWS) if tenant == name]
            if dtype == torch.float32:
                torch.testing.assert_close(mixed[rows], expected[rows], **TOLERANCES[dtype])
