"""`kvtune profile` through typer's CliRunner and the real CLI app."""

import json
import time

import pytest
import yaml
from typer.testing import CliRunner

from kvtune.cli import app
from kvtune.profile import load_profile

AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:50.99,396,109\n" \
        "2023-11-16 18:15:52.00,879,55\n"


def run(args, **kw):
    """``kvtune profile ARGS`` through the real CLI app (its one-line error handling included)."""
    return CliRunner().invoke(app, ["profile", *args], **kw)


def user_error(result):
    """The CLI's one-line error: exit code 2, the error as the last line on stderr (after progress lines)."""
    assert result.exit_code == 2, result.output
    text = result.stderr if hasattr(result, "stderr") else result.output
    errors = [line for line in text.splitlines() if line.startswith("kvtune: error:")]
    assert len(errors) == 1 and text.rstrip("\n").splitlines()[-1] == errors[0], text
    return errors[0]


def test_writes_a_valid_profile_quickly(tmp_path):
    out = tmp_path / "p.yaml"
    t0 = time.perf_counter()
    r = run(["--quick", "-o", str(out), "--offload-dir", str(tmp_path), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - t0 < 120
    prof = load_profile(out)
    assert prof.hardware.cpu_ram_total_bytes > 0 and prof.workload is None and prof.model is None
    doc = json.loads(r.stdout)
    assert doc["hardware"]["name"] == prof.hardware.name


def test_trace_and_model_print_distribution_and_capacity(tmp_path):
    trace = tmp_path / "a.csv"
    trace.write_text(AZURE)
    out = tmp_path / "p.yaml"
    r = run(["--quick", "-t", str(trace), "-m", "llama-3.1-8b", "--hardware", "h100-sxm", "-o", str(out)])
    assert r.exit_code == 0, r.output
    for text in ("Workload: a.csv (3 requests, azure)", "p99", "Input tokens", "Capacity on h100-sxm", "kivi-2b/g32"):
        assert text in r.stdout
    prof = load_profile(out)
    assert prof.workload.requests == 3 and prof.capacity.rows[0].codec == "fp16"
    assert prof.hardware.source == "datasheet" and prof.model.kv_bytes_per_token == 131072


def test_never_overwrites_without_force(tmp_path):
    out = tmp_path / "p.yaml"
    out.write_text("mine\n")
    r = run(["--quick", "--hardware", "l4", "-o", str(out)])
    assert "already exists (pass --force to overwrite)" in user_error(r)
    assert out.read_text() == "mine\n"
    r = run(["--quick", "--hardware", "l4", "-o", str(out), "--force", "--format", "yaml"])
    assert r.exit_code == 0 and yaml.safe_load(out.read_text())["hardware"]["name"] == "l4"


def test_hardware_alone_prints_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run(["--hardware", "h200", "--format", "yaml"])
    assert r.exit_code == 0 and yaml.safe_load(r.stdout)["hardware"]["hbm_bandwidth_gbps"] == 4800.0
    assert list(tmp_path.iterdir()) == []
    r = run(["--hardware", "list"])
    assert r.exit_code == 0 and "rtx-4090" in r.stdout.split()


def test_bad_inputs_are_one_line_errors(tmp_path):
    assert "unknown hardware 'b200'" in user_error(run(["--hardware", "b200"]))
    assert "unknown model 'nope'" in user_error(run(["--model", "nope", "-o", str(tmp_path / "p.yaml")]))
    assert "no such trace file" in user_error(run(["-t", str(tmp_path / "x.csv"), "-o", str(tmp_path / "p.yaml")]))
    bad = tmp_path / "bad.csv"
    bad.write_text(AZURE + "x,y,z\n")
    msg = user_error(run(["-t", str(bad), "--strict", "--hardware", "l4", "-o", str(tmp_path / "p.yaml")]))
    assert "bad.csv:5:" in msg
    assert not (tmp_path / "p.yaml").exists()  # no half-written output


def test_plot_without_matplotlib_is_one_clear_line(tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        trace = tmp_path / "a.csv"
        trace.write_text(AZURE)
        msg = user_error(run(["-t", str(trace), "--plot", str(tmp_path / "h.png"), "--hardware", "l4",
                              "-o", str(tmp_path / "p.yaml")]))
        assert "--plot needs matplotlib" in msg and "pip install" in msg
        assert not (tmp_path / "p.yaml").exists()
    else:
        pytest.skip("matplotlib is installed here: the missing-matplotlib message cannot be provoked")


def test_memory_fraction_is_checked(tmp_path):
    msg = user_error(run(["--hardware", "l4", "--memory-fraction", "3", "-o", str(tmp_path / "p.yaml")]))
    assert "--memory-fraction 3.0: expected a value in (0, 1]" in msg


def test_unknown_trace_layout_fails_before_probing(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("# just some notes\nhello\n")
    r = run(["-t", str(junk), "-o", str(tmp_path / "p.yaml")])
    msg = user_error(r)
    assert "cannot tell the trace format" in msg and "--trace-format" in msg
    assert "profiling this machine" not in r.output
