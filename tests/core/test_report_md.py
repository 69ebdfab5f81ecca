"""``recommend --report DIR`` (kvtune/report_md.py): the Markdown report, its PNGs, and how the folder is written.

The trials are real measurements (tests/core/data/report_trials.yaml: quick ``kvtune recommend`` runs, see its
header); the report must show their figures as kvtune.report formats them, with every serving figure's source.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from kvtune.cli import app
from kvtune.errors import UserError
from kvtune.pipeline import Bucket, Pipeline
from kvtune.profile.workload import default_workload
from kvtune.report import front_rows, side_by_side_rows
from kvtune.report_md import BUCKETS_HOOK, MARKER, ReportInput, check_report_dir, render_markdown, write_report
from kvtune.scenarios import get_scenario
from kvtune.search import choose, pareto_front

DATA = Path(__file__).parent / "data" / "report_trials.yaml"
needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                               reason="needs matplotlib (pip install 'kvtune[plot]'; [dev] includes it)")


def _input(scenario: str = "minimal-change") -> ReportInput:
    trials = [Pipeline.from_dict(d) for d in yaml.safe_load(DATA.read_text())[scenario]]
    scen = get_scenario(scenario)
    best, feasible = choose(trials, scen)
    assert best is not None
    return ReportInput(trials=trials, best=best, feasible=feasible, scenario=scen, workload=default_workload(),
                       study="s", storage="postgresql://kv:***@db:5432/optuna", rejected=1)


def test_markdown_shows_the_measured_figures_and_their_sources():
    inp = _input()
    md = render_markdown(inp)
    best = inp.best
    assert f"**{best.label()}** — meets" in md
    _, _, rows = front_rows(pareto_front(inp.trials, inp.scenario.prefer), best, inp.scenario.max_quality_loss)
    for row in rows:  # the front table: the terminal's figures, cell for cell
        assert "| " + " | ".join(row) + " |" in md
    full = next(p for p in inp.trials if p.is_identity())
    _, srows = side_by_side_rows(best, full)
    for row in srows:
        assert "| " + " | ".join(row) + " |" in md
    for key, source in best.measured.serving.provenance.items():  # every serving figure's provenance
        assert f"- **{key}**: {source}" in md
    assert "![Pareto front](pareto.png)" in md and "![Workload context lengths](workload.png)" in md
    assert BUCKETS_HOOK in md and "no `buckets` section" in md
    assert "optuna-dashboard postgresql://kv:***@db:5432/optuna" in md and "put it back" in md
    assert "3 measured trials, 1 rejected before running" in md


def test_bucket_table_when_the_pipeline_routes_by_length():
    inp = _input()
    a, b = inp.trials[0], inp.trials[1]
    routed = inp.best.model_copy(update={"schema_version": 2, "buckets": [
        Bucket(max_input_tokens=4096, selection=a.selection, codec=a.codec, placement=a.placement, share=0.6,
               measured_at_tokens=2048, measured=a.measured),
        Bucket(selection=b.selection, codec=b.codec, placement=b.placement, share=0.4, measured_at_tokens=4096,
               measured=b.measured)]})
    md = render_markdown(ReportInput(**{**inp.__dict__, "best": routed}))
    assert f"| 1..4,096 | 60% | 2,048 | {a.label()} | {a.measured.quality.quality_loss:.4f} |" in md
    assert f"| > 4,096 | 40% | 4,096 | {b.label()} | {b.measured.quality.quality_loss:.4f} |" in md


@needs_mpl
def test_report_folder_and_pngs(tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "rep"
    written = write_report(out, _input("multi-turn"), force=False)
    assert written == out / "report.md"
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "report.md", "pareto.png", "workload.png"])
    for name, min_w in (("pareto.png", 1000), ("workload.png", 800)):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(out / name)
        assert img.shape[1] >= min_w and img.shape[0] >= 350
        assert float(np.asarray(img)[..., :3].std()) > 0.05  # drawn on, not a blank canvas
    assert not [p for p in tmp_path.iterdir() if p.name != "rep"]  # no staging folder left


@needs_mpl
def test_folder_rules(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine\n")
    with pytest.raises(UserError, match="not a report kvtune wrote; pass --force"):
        check_report_dir(mine, force=False)
    write_report(mine, _input(), force=True)  # --force replaces it whole
    assert not (mine / "todo.txt").exists() and (mine / "report.md").exists()
    write_report(mine, _input("multi-turn"), force=False)  # a kvtune report is replaced without --force
    assert "# kvtune report: multi-turn" in (mine / "report.md").read_text()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_report_dir(tmp_path / "file", force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_report_dir(empty, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "notes"]


def test_recommend_report_checks_come_before_the_model(tmp_path, monkeypatch):
    runner = CliRunner()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("x")
    args = ["recommend", "--report", str(mine), "-o", str(tmp_path / "p.yaml"),
            "--storage", f"sqlite:///{tmp_path}/s.db"]
    if importlib.util.find_spec("matplotlib") is not None:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "not a report kvtune wrote" in result.stderr
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = runner.invoke(app, args)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and lines == ["kvtune: error: --report: needs matplotlib (pip install 'kvtune[plot]')"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no study, no pipeline
