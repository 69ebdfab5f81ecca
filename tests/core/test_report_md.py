"""``recommend --report DIR`` (kvtune/report_md.py): the Markdown report, its PNGs, and how the folder is written.

The trials are real measurements (tests/core/data/report_trials.yaml: quick ``kvtune recommend`` runs, see its
header); the report must show their figures as kvtune.report formats them, with every serving figure's source.
"""

from __future__ import annotations

import dataclasses

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from kvtune.cli import app
from kvtune.errors import UserError
from kvtune.buckets import BucketResult, LengthBucket, aggregate
from kvtune.pipeline import Pipeline
from kvtune.profile.workload import default_workload
from kvtune.report import bucket_rows, front_rows, side_by_side_rows
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
    assert "3 measured trials, 1 rejected before running or stopped by the probe slice" in md
    repeated = dataclasses.replace(inp, trials=[*inp.trials, inp.trials[0]])  # a repeat the sampler proposed
    assert "3 pipelines measured in 4 trials (the rest repeats, recorded at no cost)" in render_markdown(repeated)


def _routed(inp: ReportInput) -> BucketResult:
    """Two buckets of real measured trials: the full cache picked in the short one, another trial in the long one."""
    a, b = inp.trials[0], inp.trials[1]
    parts = [LengthBucket(0, 4096, ((1000, 100),) * 3, 0.75, 1000, 1000, None),
             LengthBucket(1, None, ((9000, 300),), 0.25, 9000, 4096, "capped at 4,096")]
    measured = [{a.label(): a, b.label(): b}, {a.label(): a, b.label(): b}]
    scen = inp.scenario
    return BucketResult(buckets=parts, outcomes=[], measured=measured, pool=[a.label(), b.label()], picks=[a, b],
                        single=a, routed=aggregate([a, b], parts, scen), single_agg=aggregate([a, a], parts, scen),
                        notes=["bucket 2: quality measured at 4,096 tokens, not its median 9,000 (capped at 4,096)"])


def test_bucket_table_when_the_pipeline_routes_by_length():
    inp = _input()
    r = _routed(inp)
    a, b = r.picks
    md = render_markdown(ReportInput(**{**inp.__dict__, "buckets": r}))
    rows = bucket_rows(r)
    for row in rows:  # the terminal's rows, cell for cell
        assert "| " + " | ".join(row) + " |" in md
    # shares of requests and of prompt + output tokens, by hand: 3 x 1,100 and 1 x 9,300 tokens
    assert rows[0][:5] == ("[1, 4,096]", "75%", f"{100 * 3300 / 12600:.0f}%", "1,000", "1,000")
    assert rows[1][:5] == ("(4,096, inf]", "25%", f"{100 * 9300 / 12600:.0f}%", "9,000", "4,096 (capped)")
    assert rows[1][5:7] == (b.label(), f"{b.measured.quality.quality_loss:.4f}")
    assert rows[1][9:] == (f"{a.measured.quality.quality_loss:.4f}", f"{a.measured.serving.tokens_per_s:,.0f}")
    # the aggregate: 300 output tokens at a's tokens/s and 300 at b's, over the time they take
    ta, tb = a.measured.serving.tokens_per_s, b.measured.serving.tokens_per_s
    assert r.routed.tokens_per_s == pytest.approx(600 / (300 / ta + 300 / tb))
    assert r.gain == pytest.approx(r.routed.tokens_per_s / ta - 1)
    assert f"gain of routing {r.gain:+.1%} tokens/s" in md and "2 different pipelines over 2 buckets" in md
    assert "not its median 9,000" in md and "![Per-bucket candidates](buckets.png)" in md


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
    inp = _input()
    write_report(out, ReportInput(**{**inp.__dict__, "buckets": _routed(inp)}), force=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "report.md", "pareto.png", "workload.png",
                                                            "buckets.png"])
    img = imread(out / "buckets.png")
    assert img.shape[1] >= 1000 and float(np.asarray(img)[..., :3].std()) > 0.05


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
