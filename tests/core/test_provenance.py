"""Provenance of quality figures: the model quality was measured on is recorded beside the target's shapes, and
every consumer (pipeline file, Markdown report, export headers) names it rather than the priced target."""

from __future__ import annotations

from pathlib import Path

import yaml

from kvtune.export import render_pipeline
from kvtune.pipeline import ModelInfo, Pipeline, Provenance
from kvtune.profile.workload import default_workload
from kvtune.report_md import ReportInput, provenance_lines, render_markdown
from kvtune.scenarios import get_scenario
from kvtune.search import choose

DATA = Path(__file__).parent / "data" / "report_trials.yaml"
MEASURED_ON = "SmolLM2-135M-Instruct (SmolLM2-135M-Instruct.Q4_1.gguf sha256:b179c9523d0e6a0f; ran on cpu in float32)"


def _best() -> Pipeline:
    trials = [Pipeline.from_dict(d) for d in yaml.safe_load(DATA.read_text())["minimal-change"]]
    best, _ = choose(trials, get_scenario("minimal-change"))
    assert best is not None
    target = ModelInfo(name="llama-3.1-8b", source="preset:llama-3.1-8b", layers=32, kv_heads=8, q_heads=32,
                       head_dim=128, dtype="bfloat16")
    return best.model_copy(update={"provenance": Provenance(kvtune_version="0", created="2026-11-30T00:00:00Z",
                                                            model=target, quality_model=MEASURED_ON)})


def test_quality_model_round_trips_and_old_files_load_without_it():
    best = _best()
    again = Pipeline.from_dict(yaml.safe_load(best.to_yaml()))
    assert again.provenance is not None and again.provenance.quality_model == MEASURED_ON
    old = Pipeline.from_dict(yaml.safe_load(DATA.read_text())["minimal-change"][0])
    assert old.provenance is None or old.provenance.quality_model is None


def test_report_names_the_measured_model_not_the_priced_target():
    best = _best()
    inp = ReportInput(trials=[best], best=best, feasible=True, scenario=get_scenario("minimal-change"),
                      workload=default_workload(), study="s", storage="x.db")
    quality = provenance_lines(inp)[0]
    assert quality.startswith(f"- **quality** (loss, KL, top-1, probes): measured: {MEASURED_ON} run with the pipeline")
    target = best.provenance.model.name  # type: ignore[union-attr]
    assert target not in quality
    md = render_markdown(inp)
    assert f"quality measured on {MEASURED_ON}" in md and f"costs priced at {target}'s shapes" in md


def test_export_headers_say_where_quality_was_measured():
    files = render_pipeline(_best(), ["vllm", "sglang", "trtllm"])
    assert {target for target, _ in files} == {"vllm", "sglang", "trtllm"}
    for target, rendered in files:
        assert f"quality measured on: {MEASURED_ON}" in rendered.text, target
