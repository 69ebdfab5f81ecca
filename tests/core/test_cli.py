"""The CLI through typer's CliRunner: help, a tiny real recommend run, evaluate, and one-line errors."""

from __future__ import annotations

import os

import pytest
import yaml
from typer.testing import CliRunner

from kvtune.cli import app
from kvtune.pipeline import load_pipeline

runner = CliRunner()
TINY = ["--quick", "--trials", "3", "--context", "512"]


def run(args, cwd=None):
    old = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        return runner.invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
    finally:
        os.chdir(old)


def one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvtune: error: ")
    assert "Traceback" not in result.output
    return lines[0]


def test_help_lists_every_command():
    result = run(["--help"])
    assert result.exit_code == 0
    for cmd in ("recommend", "evaluate", "scenarios", "strategies", "profile", "export"):
        assert cmd in result.stdout


def test_version():
    result = run(["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("kvtune ")


def test_scenarios_and_strategies_listings():
    result = run(["scenarios", "--format", "json"])
    assert result.exit_code == 0
    names = [s["name"] for s in yaml.safe_load(result.stdout)]
    assert names == ["long-context", "minimal-change", "datacenter", "edge", "multi-turn", "prefill-heavy",
                     "accuracy-critical"]
    result = run(["strategies", "--format", "yaml"])
    rows = yaml.safe_load(result.stdout)
    assert {"snapkv", "kivi", "offload", "none"} <= {r["name"] for r in rows}
    assert all(r["citation"] for r in rows)


@pytest.mark.parametrize("args, fragment", [
    (["recommend", "--scenario", "fast"], "--scenario fast: unknown scenario"),
    (["recommend", "--bogus"], "No such option: --bogus"),
    (["recommend", "--trials", "0"], "--trials"),
    (["recommend", "--model", "/nope/model.gguf"], "--model /nope/model.gguf: no such GGUF file"),
    (["recommend", "--hardware", "h100-sxm", "--profile", "p.yaml"], "use one"),
    (["recommend", "-o", "/nonexistent-dir/x.yaml"], "folder /nonexistent-dir does not exist"),
    (["evaluate", "missing.yaml"], "missing.yaml: no such file"),
])
def test_bad_input_is_one_line_and_exit_2(args, fragment, tmp_path):
    result = run(args, cwd=tmp_path)
    assert result.exit_code == 2
    assert fragment in one_error_line(result)


def test_malformed_pipeline_yaml(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("schema_version: 1\ncodec: {method: kivi, params: {bits: 3}}\n")
    result = run(["evaluate", str(bad)])
    assert result.exit_code == 2
    assert "codec.params (kivi): bits must be 2 or 4" in one_error_line(result)
    bad.write_text("schema_version: 1\nselection: {method: snapkv, budgett: 0.5}\n")
    result = run(["evaluate", str(bad)])
    assert result.exit_code == 2 and "unknown field" in one_error_line(result)


def test_refuses_to_overwrite_a_file_it_did_not_write(tmp_path):
    mine = tmp_path / "notes.yaml"
    mine.write_text("my own notes\n")
    result = run(["recommend", "-o", str(mine)])
    assert result.exit_code == 2 and "pass --force" in one_error_line(result)
    assert mine.read_text() == "my own notes\n"


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    result = run(["recommend", "--scenario", "multi-turn", *TINY, "--export", "vllm,hf"], cwd=folder)
    return folder, result


def test_tiny_recommend_writes_a_measured_pipeline(tiny_study):
    folder, result = tiny_study
    assert result.exit_code == 0, result.output
    p = load_pipeline(folder / "kvtune-pipeline.yaml")
    assert p.selection.method == "none"  # multi-turn never drops tokens
    assert p.measured is not None and p.measured.trial is not None
    assert p.measured.cost.context_tokens == 512
    assert p.measured.quality.eval_tokens > 0
    assert p.provenance.scenario == "multi-turn" and p.provenance.model.layers == 30
    assert "Pareto front" in result.stdout and "Recommended for multi-turn" in result.stdout
    assert (folder / "kvtune-study.db").exists()
    assert any(f.name.startswith("vllm") for f in folder.iterdir())
    assert not [f for f in folder.iterdir() if f.name.endswith(".tmp")]  # no partial files


def test_resume_keeps_earlier_trials_and_backs_up_output(tiny_study):
    folder, _ = tiny_study
    result = run(["recommend", "--scenario", "multi-turn", *TINY[:1], "--trials", "1", "--context", "512",
                  "--format", "json"], cwd=folder)
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(result.stdout)
    assert doc["trials"] == 4  # 3 earlier + 1 new, all in the report
    assert (folder / "kvtune-pipeline.yaml.bak").exists()


def test_evaluate_measures_a_given_pipeline(tmp_path):
    src = tmp_path / "in.yaml"
    src.write_text("schema_version: 1\ncodec: {method: kivi, params: {bits: 4, group_size: 32, residual: 64}}\n")
    result = run(["evaluate", str(src), "--quick", "--context", "512", "-o", str(tmp_path / "out.yaml"),
                  "--format", "json"])
    assert result.exit_code == 0, result.output
    out = load_pipeline(tmp_path / "out.yaml")
    assert out.measured.cost.compression_ratio > 3.0
    assert 0.0 < out.measured.quality.kl_mean < 0.5
    assert src.read_text().startswith("schema_version: 1\ncodec")  # input untouched


def test_same_seed_same_trials(tmp_path):
    """The same seed samples the same candidates and measures the same quality; which one wins may still
    differ, since latency is measured (and offload feasibility depends on it)."""
    runs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        result = run(["recommend", "--scenario", "accuracy-critical", *TINY, "--format", "json"], cwd=folder)
        assert result.exit_code == 0, result.output
        runs.append(yaml.safe_load(result.stdout))
    assert runs[0]["tried"] == runs[1]["tried"] and len(runs[0]["tried"]) == 3
    losses = [{p["codec"]["method"]: p["measured"]["quality"]["quality_loss"] for p in r["pareto_front"]} for r in runs]
    assert all(v == 0.0 for d in losses for v in d.values())  # accuracy-critical: lossless only
