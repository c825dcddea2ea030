"""`multimoe consolidate` from the shell: saves a loadable model and prints the summary."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from multimoe import MultiTenantMixtralForCausalLM


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "multimoe.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_consolidate_command_saves_a_model_and_prints_the_report(tenants, tokenizer, tmp_path, batch):
    for name in ("base", "chat"):
        tenants[name].save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "calibration.txt").write_text("hello there\nwhat is 2+2?\nsort dcba\n")
    result = run_cli(
        "consolidate", "--tenant", f"base={tmp_path / 'base'}", "--tenant", f"chat={tmp_path / 'chat'}",
        "--memory-budget", "1.6x", "--similarity", "output", "--merge", "usage_weighted",
        "--calibration", str(tmp_path / "calibration.txt"), "--heatmap", str(tmp_path / "heat.png"),
        "--out", str(tmp_path / "out"), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Deciding limit: **memory_budget**" in result.stdout and "shared expert pool" in result.stdout
    assert "similarity" in result.stderr  # the progress bar
    model = MultiTenantMixtralForCausalLM.from_pretrained(tmp_path / "out")
    assert model.tenants == ["base", "chat"]
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"
    with torch.no_grad():
        assert model(**batch, tenant="chat").logits.shape[-1] == tenants["chat"].config.vocab_size


def test_bad_input_is_one_clear_line(tenants, tmp_path):
    tenants["base"].save_pretrained(tmp_path / "base")
    result = run_cli("consolidate", "--tenant", f"base={tmp_path / 'base'}", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: consolidate needs at least two tenants")
    result = run_cli("consolidate", "--tenant", "nameonly", "--out", "o", cwd=tmp_path)
    assert result.returncode == 2 and "NAME=SOURCE" in result.stderr


def test_calibration_file_is_texts_or_jsonl_pairs(tmp_path):
    from multimoe.cli import read_calibration

    (tmp_path / "c.txt").write_text("hello there\n\nsort dcba\n")
    assert read_calibration(tmp_path / "c.txt") == ["hello there", "sort dcba"]
    (tmp_path / "c.jsonl").write_text('{"prompt": "2+2=", "completion": "4"}\n\n{"prompt": "ab", "completion": "ba"}\n')
    assert read_calibration(tmp_path / "c.jsonl") == [{"prompt": "2+2=", "completion": "4"}, {"prompt": "ab", "completion": "ba"}]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "2+2=", "completion": "4"}\n{"prompt": \n')
    with pytest.raises(SystemExit, match="bad.jsonl line 2 is not JSON"):
        read_calibration(tmp_path / "bad.jsonl")
