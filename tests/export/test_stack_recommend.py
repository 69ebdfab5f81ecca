"""``recommend --stack X --export X`` end to end: the export holds only what X applies, parses with X's own loader,
and carries the figures the report and the pipeline file carry (issue 12's done-when).

Two sources of recommendations:

* recorded: the pipelines and reports of the full-length runs pasted in docs/exports.md
  (``kvtune recommend --scenario datacenter --stack X --hardware h100-sxm --target llama-3.1-8b --export X``), kept
  under ``data/stack_recommend/<stack>/`` (``kvtune-pipeline.yaml`` and the report it printed, ``stdout.txt``); they
  are exported again here with today's code;
* live: one tiny stack-constrained study (``--quick``, 3 trials, 512 tokens) through the CLI, for vLLM, whose profile
  has the most numerics variants (about 2 CPU-minutes; the other stacks take the same code path).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from export_cases import check_value
from test_export_real_parsers import parse_with_sglang, parse_with_vllm
from typer.testing import CliRunner

from kvtune.cli import app
from kvtune.export import render_pipeline
from kvtune.export._common import load_options
from kvtune.pipeline import Pipeline, load_pipeline
from kvtune.report import measured_lines
from kvtune.stacks import AXES, get_profile, nearest

DATA = Path(__file__).parent / "data" / "stack_recommend"
RUN = ("vllm", "sglang", "trtllm")
FILES = {"vllm": "vllm.yaml", "sglang": "sglang.yaml", "trtllm": "trtllm.yaml"}
EXACT = "Measured by kvtune on exactly what this file runs"


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def in_report(p: Pipeline, stdout: str) -> None:
    """Every figure line of the pipeline file is in the report recommend printed (rich may wrap long lines)."""
    report = flat(stdout)
    for line in measured_lines(p):
        assert flat(line) in report, line


def header_block(text: str) -> list[str]:
    """The measured figures in an export's comment header (after the 'Measured by kvtune ...' title)."""
    header = [line[2:] if line.startswith("# ") else line[1:] for line in text.splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(header) if line.startswith("Measured by kvtune"))
    assert header[start].startswith(EXACT), header[start]
    return [line[2:] for line in header[start + 1:]]


def check_export(p: Pipeline, stack: str, folder: Path) -> dict:
    """Export ``p`` to ``stack`` into ``folder`` and check it as the done-when asks; return the parsed body."""
    profile = get_profile(stack)
    for axis in AXES:  # the search stayed inside the stack's space, with its numerics
        assert profile.runs(getattr(p, axis), axis), (axis, getattr(p, axis).label())
    assert nearest(p, profile)[1] == [], "the export runs the pipeline as measured"
    [(_, rendered)] = render_pipeline(p, [stack])
    assert rendered.filename == FILES[stack]
    assert rendered.notes == (), f"nothing left out or changed: {rendered.notes}"
    path = folder / rendered.filename
    path.write_text(rendered.text, encoding="utf-8")
    assert header_block(rendered.text) == measured_lines(p)
    body = yaml.safe_load(rendered.text)
    written = set(body) | {k for v in body.values() if isinstance(v, dict) for k in v}
    ignored = {entry.split()[0] for entry in profile.get("ignored") or ()}  # "sink_token_length (PyTorch backend)"
    assert not written & ignored, f"settings {profile.label} ignores: {written & ignored}"
    keys = load_options(profile.options)["keys"]
    problems = [msg for key, value in body.items() for msg in
                ([f"{key}: not an option of {profile.label}"] if key not in keys else check_value(key, value, keys[key]))]
    assert problems == []
    if stack == "vllm":
        args = parse_with_vllm(path)
    elif stack == "sglang":
        args = parse_with_sglang(path)
    else:  # TensorRT-LLM has no source on PyPI: the recorded option list (checked above) is the loader
        return body
    for key, value in body.items():
        assert args[key.replace("-", "_")] == value, key
    return body


@pytest.mark.parametrize("stack", RUN)
def test_recorded_full_run_exports_what_was_measured(stack: str, tmp_path: Path) -> None:
    folder = DATA / stack
    if not folder.is_dir():
        pytest.fail(f"missing {folder}: copy kvtune-pipeline.yaml and the stdout of the documented run")
    p = load_pipeline(folder / "kvtune-pipeline.yaml")
    assert p.name == f"datacenter recommendation for {get_profile(stack).label}"
    in_report(p, (folder / "stdout.txt").read_text(encoding="utf-8"))
    check_export(p, stack, tmp_path)


def _run(args: list[str], cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
    finally:
        os.chdir(old)


def test_tiny_stack_study_exports_what_it_measured(tmp_path: Path) -> None:
    stack = "vllm"
    result = _run(["recommend", "--scenario", "datacenter", "--stack", stack, "--hardware", "h100-sxm", "--target",
                   "llama-3.1-8b", "--quick", "--trials", "3", "--context", "512", "--export", stack], tmp_path)
    assert result.exit_code == 0, result.output
    p = load_pipeline(tmp_path / "kvtune-pipeline.yaml")
    written = (tmp_path / FILES[stack]).read_text(encoding="utf-8")
    assert header_block(written) == measured_lines(p), "the file recommend wrote carries the pipeline's figures"
    in_report(p, result.stdout)
    assert f"measured with {get_profile(stack).label}'s numerics" in result.stderr
    again = tmp_path / "again"
    again.mkdir()
    check_export(p, stack, again)
