"""`kvtune recommend --stack`: a bad stack or version is one line, exit 2, before the model loads; nothing written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kvtune.cli import app


@pytest.mark.parametrize(("stack", "message"), [
    ("ollama", "--stack 'ollama': unknown stack (choose from vllm, sglang, trtllm, lmcache, hf, kvpress"),
    ("vllm@0.2", "--stack 'vllm@0.2': kvtune has no profile of vLLM 0.2 (known: 0.33.0, 0.11.1)"),
])
def test_bad_stack_is_one_line_before_anything_loads(stack: str, message: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["recommend", "--scenario", "datacenter", "--stack", stack, "--quick"],
                                env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 2
    out = result.output.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("kvtune: error: ") and message in out[0]
    assert list(tmp_path.iterdir()) == [], "nothing written (no study file, no pipeline)"
