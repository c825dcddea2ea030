"""Every Python snippet in README.md and docs/*.md runs as written, offline, on the shipped testbed.

The rule: the ```python blocks of one markdown file run in order in one namespace, like the cells of
a notebook (a block may use what an earlier block of the same file defined), with the working
directory a fresh temporary directory, so that whatever a snippet writes lands there. A block whose
first line is `# not run in the tests: <reason>` (the network, several GPUs, minutes of work) is only
compiled, and its reason must be given. `multimoe ...` commands in ```bash blocks must parse.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import huggingface_hub.constants
import pytest

from multimoe.cli import parser

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
MARKER = re.compile(r"#\s*not run in the tests\b:?(.*)")


def blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """(line of the block's first code line, code) for each fenced block in `language`."""
    text = path.read_text()
    return [
        (text.count("\n", 0, match.start(2)) + 1, match.group(2))
        for match in FENCE.finditer(text)
        if match.group(1) == language
    ]


def not_run_reason(path: Path, line: int, code: str) -> str | None:
    """The marker's reason, or None for a snippet that runs; a marker without a reason fails."""
    marker = MARKER.fullmatch(code.splitlines()[0].strip()) if code.strip() else None
    if marker is None:
        return None
    reason = marker.group(1).strip()
    assert reason, f"{path.name}:{line}: the not-run marker gives no reason"
    return reason


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda path: str(path.relative_to(ROOT)))
def test_python_snippets_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a Hub call fails at once
    namespace = {"__name__": "__docs__"}
    for line, code in blocks(path, "python"):
        # Padding keeps the markdown file's line numbers in tracebacks.
        compiled = compile("\n" * (line - 1) + code, str(path), "exec")
        if not_run_reason(path, line, code) is None:
            exec(compiled, namespace)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda path: str(path.relative_to(ROOT)))
def test_cli_commands_parse(path):
    for line, code in blocks(path, "bash"):
        for command in re.split(r"&&|\n", code.replace("\\\n", " ")):
            words = shlex.split(command, comments=True)
            if words[:1] == ["multimoe"]:
                try:
                    parser().parse_args(words[1:])
                except SystemExit:
                    pytest.fail(f"{path.name}:{line}: {command.strip()!r} does not parse (usage above)")
