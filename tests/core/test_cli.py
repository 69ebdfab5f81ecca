"""The CLI through typer's CliRunner: help, a tiny real recommend run, evaluate, and one-line errors."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from kvtune.cli import app
from kvtune.pipeline import Pipeline, load_pipeline
from kvtune.strategies import multiturn_safe

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
    assert p.selection.method in multiturn_safe("selection")  # multi-turn never drops a token for good
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
    study = optuna.load_study(study_name=doc["recommended"]["provenance"]["study"], storage=f"sqlite:///{folder}/kvtune-study.db")
    # --trials 1: one pipeline the study had not measured (repeats of measured ones are free and do not count)
    assert doc["new_candidates"] == 1 and 1 <= doc["new_trials"] <= 3
    assert doc["trials"] == sum("pipeline" in t.user_attrs for t in study.trials)  # every measured trial reported
    split = len(study.trials) - doc["new_trials"]  # this run's trials come last

    def labels(trials) -> set[str]:
        return {Pipeline.model_validate(t.user_attrs["pipeline"]).label() for t in trials if "pipeline" in t.user_attrs}

    assert labels(study.trials[:split]) <= set(doc["tried"])  # the earlier trials stay in the report
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
    assert runs[0]["tried"] == runs[1]["tried"]  # repeats included, in order
    assert len(set(runs[0]["tried"])) == runs[0]["new_candidates"] == 3  # --trials 3: three pipelines measured
    losses = [{p["codec"]["method"]: p["measured"]["quality"]["quality_loss"] for p in r["pareto_front"]} for r in runs]
    assert all(v == 0.0 for d in losses for v in d.values())  # accuracy-critical: lossless only


# -- hardening (issue 14): checks before the model loads, files, terminal safety, SIGKILL -------------------


def test_version_and_help_import_no_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom kvtune.cli import app\n"
            "for args in (['--version'], ['--help'], ['export', '--help']):\n"
            "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
            "print(sorted(m for m in ('torch', 'transformers', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading the model."""
    def refuse(**_):
        raise AssertionError("the model was loaded before the input was checked")

    from kvtune.commands import evaluate as evaluate_cmd
    from kvtune.commands import recommend as recommend_cmd

    monkeypatch.setattr(recommend_cmd, "prepare", refuse)
    monkeypatch.setattr(evaluate_cmd, "prepare", refuse)


@pytest.mark.parametrize("args, fragment", [
    (["--storage", "journal:"], "no journal file path"),
    (["--storage", "postgresql://kv:s3cret@127.0.0.1:1/db"], "postgresql://kv:***@127.0.0.1:1/db"),
    (["--storage", "sqlite:////nonexistent-dir/s.db"], "folder /nonexistent-dir does not exist"),
    (["--context", "99999999999"], "--context 99999999999: must be in 1..16777216"),
    (["--export", "vllm,tgi"], "unknown export target 'tgi'"),
    (["--export", "vllm", "--export-dir", "afile"], "is not a directory"),
    (["--export", "vllm", "--export-dir", "/proc/sys"], "is not writable"),
    (["--export", "vllm,hf", "--export-dir", "exp"], "exp/vllm.yaml already exists"),
    (["-o", ""], "empty path"),
])
def test_recommend_checks_inputs_before_the_model(tmp_path, no_model, args, fragment):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "vllm.yaml").write_text("mine\n")
    result = run(["recommend", "--quick", *args], cwd=tmp_path)
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert fragment in line and "s3cret" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "exp"]  # no study file, no output


def test_evaluate_checks_inputs_before_the_model(tmp_path, no_model):
    cases = {
        "empty.yaml": ("", "empty document"),
        "rank.yaml": ("schema_version: 1\ncodec: {method: lowrank, params: {rank: 100}}\nprovenance: {kvtune_version: '0', "
                      "created: '2025-01-01T00:00:00+00:00', model: {name: m, source: org/m, layers: 2, kv_heads: 1, "
                      "q_heads: 1, head_dim: 64, dtype: float16}}\n", "rank must be <= the head dim (64), got 100"),
        "sinks.yaml": ("schema_version: 1\nselection: {method: streaming_llm, params: {sinks: 1000000000}}\n",
                       "sinks must be in 0..16777216"),
        "frac.yaml": ("schema_version: 1\nswitches: {gpu_memory_fraction: .nan}\n", "gpu_memory_fraction"),
        "nest.yaml": ("schema_version: 1\nname: " + "[" * 3000 + "]" * 3000 + "\n", "nested deeper than 64 levels"),
        "x\x1b]0;pwned\x07.yaml": ("schema_version: 1\ncodec: {method: kivi, params: {bits: 3}}\n",
                                    "x\\x1b]0;pwned\\x07.yaml: codec.params (kivi): bits must be 2 or 4"),
    }
    for name, (text, fragment) in cases.items():
        (tmp_path / name).write_text(text)
        result = run(["evaluate", str(tmp_path / name), "--quick"])
        assert result.exit_code == 2 and fragment in one_error_line(result), (name, result.output)
        assert "\x1b" not in result.output
    result = run(["evaluate", str(tmp_path / "frac.yaml"), "--context", "0"])
    assert result.exit_code == 2


EXPORT_KILLER = r"""
import os, signal, sys
from pathlib import Path
import kvtune.io as io
from kvtune.commands.export import write_exports
from kvtune.pipeline import Pipeline, load_pipeline
calls = {"n": 0}
real_replace, real_rename = os.replace, os.rename
def replace(src, dst):
    calls["n"] += 1
    if calls["n"] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # killed between the moves of one export
    return real_replace(src, dst)
def rename(src, dst):
    os.kill(os.getpid(), signal.SIGKILL)  # killed with everything staged, before the folder appears
os.replace, os.rename = replace, rename
write_exports(load_pipeline(sys.argv[1]), ["all"], sys.argv[2])
"""


@pytest.mark.parametrize("existing_folder", [True, False])
def test_export_killed_midway_then_rerun_succeeds(tmp_path, existing_folder):
    src = tmp_path / "p.yaml"
    src.write_text("schema_version: 1\nselection: {method: snapkv, params: {budget: 0.25}}\n")
    out = tmp_path / "out"
    if existing_folder:
        out.mkdir()
    child = subprocess.run([sys.executable, "-c", EXPORT_KILLER, str(src), str(out), "3"], capture_output=True)
    assert child.returncode == -signal.SIGKILL
    if not existing_folder:
        assert not out.exists()  # the folder appears whole or not at all
    result = run(["export", str(src), "--to", "all", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert len(list(out.iterdir())) == 8
    assert not [p for p in tmp_path.rglob("*") if ".kvtune-stage-" in p.name or p.name.endswith(".tmp")]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    src = tmp_path / "p.yaml"
    src.write_text("schema_version: 1\n")
    old = os.umask(umask)
    try:
        assert run(["export", str(src), "--to", "vllm,hf", "-o", str(tmp_path / "new")]).exit_code == 0
        assert run(["export", str(src), "--to", "vllm", "-o", str(tmp_path)]).exit_code == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "new" / "vllm.yaml", tmp_path / "new" / "hf_kvtune.py", tmp_path / "vllm.yaml"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o777 & ~umask
    (tmp_path / "vllm.yaml").chmod(0o640)
    src.write_text("schema_version: 1\nname: changed\n")
    assert run(["export", str(src), "--to", "vllm", "-o", str(tmp_path), "--force"]).exit_code == 0
    assert stat.S_IMODE((tmp_path / "vllm.yaml").stat().st_mode) == 0o640  # --force keeps the file's mode


@pytest.mark.skipif(os.environ.get("KVTUNE_SIGKILL_RECOMMEND") != "1",
                    reason="a real recommend killed and resumed takes minutes on a CPU; set KVTUNE_SIGKILL_RECOMMEND=1 "
                           "(test_storage.py kills a study mid-trial in seconds)")
def test_recommend_sigkill_then_resume(tmp_path):
    db = tmp_path / "s.db"
    env = {**os.environ, "KVTUNE_HEARTBEAT_INTERVAL": "2", "KVTUNE_HEARTBEAT_GRACE": "5", "COLUMNS": "200"}
    exe = str(Path(sys.executable).with_name("kvtune"))
    base = [exe, "recommend", "--quick", "--context", "512", "--storage", f"sqlite:///{db}", "--study-name", "k"]
    child = subprocess.Popen([*base, "--trials", "6"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 1800
    done: dict[int, dict] = {}
    while time.time() < deadline:
        time.sleep(2)
        if db.exists():
            try:
                study = optuna.load_study(study_name="k", storage=f"sqlite:///{db}")
            except KeyError:
                continue
            done = {t.number: t.params for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
            running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            if len(done) >= 1 and running:
                break
    child.kill()
    child.wait()
    assert done, "no trial finished before the deadline"
    time.sleep(6)  # past the grace period
    resumed = subprocess.run([*base, "--trials", "1", "--format", "json"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    after = {t.number: t.params for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert all(after.get(n) == p for n, p in done.items())  # 0 finished trials lost
