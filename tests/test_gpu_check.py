"""scripts/gpu_check.sh cannot rot unnoticed: its dry run (CPU, tiny shapes, no wheels) runs every part."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = {"tests.log", "model_overhead.txt", "serving.txt", "kernels.txt", "paper_scale.txt",
         "paper_scale.json", "summary.md"}


def test_the_dry_run_runs_every_part_and_writes_every_figure(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--device", "cpu", "--quick"],
        capture_output=True, text=True, timeout=240, env=os.environ | {"MULTIMOE_TEST_DEVICE": "cpu"},
    )
    assert result.returncode == 0, (result.stdout + (tmp_path / "summary.md").read_text())[-3000:]
    assert {path.name for path in tmp_path.iterdir()} == FILES
    assert "all parts passed" in (tmp_path / "summary.md").read_text()
    assert " passed" in (tmp_path / "tests.log").read_text()
    scale = json.loads((tmp_path / "paper_scale.json").read_text())
    # The model holds exactly the arithmetic's parameters: one pool, each tenant's own layers.
    assert abs(scale["memory"]["parameters_gb"] - scale["memory"]["arithmetic_gb"]) < 1e-9
    assert scale["tenants"] == 8 and scale["mixed_vs_one_tenant"]["ratio"] > 0


def test_a_wrong_argument_is_refused_with_its_usage(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--fast"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage:" in result.stderr
