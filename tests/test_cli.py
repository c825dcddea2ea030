"""`multimoe consolidate` from the shell: saves a loadable model and prints the summary."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch

from multimoe import MultiTenantMixtralForCausalLM
from multimoe.cli import main, parser


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
    with pytest.raises(ValueError, match="bad.jsonl line 2 is not JSON"):
        read_calibration(tmp_path / "bad.jsonl")


def exit_status_and_error(capsys, *argv) -> tuple[int, str]:
    """`multimoe ARGV` in this process: its exit status and the last line it printed to stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()[-1]


# Tenants that do not exist: a flag checked only after work has started would fail on them first.
CONSOLIDATE = ("consolidate", "--tenant", "a=missing/a", "--tenant", "b=missing/b")
INTO_NEW_DIRECTORY = (*CONSOLIDATE, "--out", "{tmp}/out")


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*CONSOLIDATE, "--out", "{file}"], r"argument --out: .*not-a-dir exists and is not a directory$"),
        ([*CONSOLIDATE, "--out", "{file}/model"], r"argument --out: cannot create .*/model: .*not-a-dir is a file$"),
        ([*INTO_NEW_DIRECTORY, "--heatmap", "{tmp}"], r"argument --heatmap: .* exists and is not a file$"),
        ([*INTO_NEW_DIRECTORY, "--threshold", "nan"], "argument --threshold: threshold must be a finite number"),
        ([*INTO_NEW_DIRECTORY, "--threshold", "-1"], "argument --threshold: threshold must be at least 0, got -1.0"),
        ([*INTO_NEW_DIRECTORY, "--max-quality-loss", "-0.5"], "--max-quality-loss: max_quality_loss must be at least"),
        ([*INTO_NEW_DIRECTORY, "--max-quality-loss", "lots"], "max_quality_loss must be a number, got str 'lots'"),
        (["demo", "--examples", "0"], "argument --examples: examples must be positive, got 0"),
        (["demo", "--examples", "2.5"], "argument --examples: examples must be an int, got str '2.5'"),
        (["demo", "--threads", "-1"], "argument --threads: threads must be positive, got -1"),
    ],
)
def test_bad_flags_exit_with_status_2_before_any_work(capsys, tmp_path, argv, message):
    (tmp_path / "not-a-dir").write_text("")
    argv = [arg.format(file=tmp_path / "not-a-dir", tmp=tmp_path) for arg in argv]
    status, error = exit_status_and_error(capsys, *argv)
    assert status == 2
    assert re.search(message, error), error


def test_consolidate_refuses_a_repeated_tenant_name_with_status_2(capsys, tmp_path):
    status, error = exit_status_and_error(capsys, *CONSOLIDATE, "--tenant", "a=missing/c",
                                          "--out", str(tmp_path / "out"))
    assert (status, error) == (2, "error: each --tenant needs its own name; given more than once: a")


def test_bad_calibration_file_is_refused_with_status_2_before_loading(capsys, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": \n')
    status, error = exit_status_and_error(capsys, *CONSOLIDATE, "--calibration", str(tmp_path / "bad.jsonl"),
                                          "--out", str(tmp_path / "out"))
    assert status == 2 and re.fullmatch(r"error: .*bad\.jsonl line 1 is not JSON \(Expecting value\)", error), error


def test_threshold_inf_means_no_distance_limit_as_in_the_api(tmp_path):
    args = parser().parse_args([*CONSOLIDATE, "--threshold", "inf", "--out", str(tmp_path / "new" / "out")])
    assert args.threshold == math.inf and args.out == str(tmp_path / "new" / "out")
