"""scripts/gpu-check.sh --dry-run end to end on this CPU (its plumbing: every step, the JSON, the log, the
calibration table), the script's argument errors, and the companion fetch-wheels.sh's argument handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvtune.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
STEPS = ["setup", "env", "tests", "kernels", "profile", "recommend"]


def _bash(*args, env=None, timeout=60):
    return subprocess.run(["bash", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = _bash(SCRIPT, out, "--dry-run", timeout=720)
    return out, proc


@pytest.mark.slow
def test_dry_run_passes_every_step_and_writes_one_json_and_a_log(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((out / "gpu-check.json").read_text())
    assert summary["dry_run"] is True and summary["passed"] is True
    assert [s["step"] for s in summary["steps"]] == STEPS
    assert all(s["passed"] for s in summary["steps"])
    assert "no figure here describes a GPU" in summary["note"]
    log = (out / "gpu-check.log").read_text()
    for name in STEPS:
        assert f"== {name}: rc=0" in log
    assert sorted(p.name for p in out.iterdir()) == ["calibration.yaml", "gpu-check.json", "gpu-check.log",
                                                    "pipeline.yaml", "profile.yaml"]
    kernels = summary["kernels"]
    assert kernels["interpreted"] is True and kernels["backend"] == "triton"  # the Triton kernels really ran
    ops = {r["op"] for r in summary["decode_at_largest_context"]}
    assert {"SDPA float16 (baseline)", "decode float16", "decode fp8 e4m3", "decode KIVI int4", "decode KIVI int2"} <= ops
    assert summary["prefetch"] and summary["prefetch"][0]["hidden_fraction"] is None  # overlap needs a GPU
    pipeline = load_pipeline(out / "pipeline.yaml")
    assert pipeline.measured is not None and pipeline.measured.cost.backend == "torch-cpu"
    assert summary["recommend"]["recommended"]["name"] == pipeline.name


@pytest.mark.slow
def test_dry_run_calibration_table_round_trips(dry_run):
    out, _proc = dry_run
    path = out / "calibration.yaml"
    doc = yaml.safe_load(path.read_text())
    assert doc["schema_version"] == 1 and doc["hbm_copy_gbps"] > 0
    codecs = [e["codec"] for e in doc["entries"]]
    assert codecs == ["fp16", "fp8", "kivi-4", "kivi-2"]
    for e in doc["entries"]:
        assert e["op"] == "decode_attention" and e["source"] == "measured" and 0 < e["efficiency"] <= 1
        assert e["hardware"].startswith("cpu ") and "Triton interpreter" in e["citation"]
    from kvtune.measure.calibration import load_table

    table = load_table(path)
    assert [(e.codec, e.efficiency) for e in table.entries] == [(e["codec"], e["efficiency"]) for e in doc["entries"]]


def test_arguments_are_checked(tmp_path):
    proc = _bash(SCRIPT)
    assert proc.returncode == 2 and "usage: bash scripts/gpu-check.sh OUTDIR [--dry-run]" in proc.stderr
    proc = _bash(SCRIPT, tmp_path, "--fast")
    assert proc.returncode == 2 and "gpu-check.sh: error: unknown option --fast" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written
    proc = _bash(SCRIPT, "--help")
    assert proc.returncode == 0 and "--dry-run proves the plumbing" in proc.stdout


def test_fetch_wheels_arguments(tmp_path):
    proc = _bash(ROOT / "scripts" / "fetch-wheels.sh", "--fast")
    assert proc.returncode == 2 and "fetch-wheels.sh: error: unknown option --fast" in proc.stderr
    proc = _bash(ROOT / "scripts" / "fetch-wheels.sh", "--help")
    assert proc.returncode == 0 and "--no-index --find-links wheels" in proc.stdout
