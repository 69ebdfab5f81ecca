"""benchmarks/search.py's machinery on a synthetic cached grid: the discretized space, the replay (nothing
measured, repeats free, the multi-fidelity cost rule) and the hypervolume score. The real grid's numbers are in
docs/benchmarks.md; here the grid's figures are made up so every expectation can be computed by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kvtune.pipeline import CostResult, Measured, Pipeline, QualityResult, ServingResult
from kvtune.search import choose

spec = importlib.util.spec_from_file_location("bench_search", Path(__file__).parents[2] / "benchmarks" / "search.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)  # type: ignore[union-attr]


def _with(p: Pipeline, loss: float, tps: float, bpt: float) -> Pipeline:
    q = QualityResult(quality_loss=loss, kl_mean=loss, kl_max=loss, top1_agreement=1.0, perplexity=1.0,
                      perplexity_full=1.0, eval_tokens=1)
    m = Measured.model_construct(quality=q, cost=CostResult.model_construct(bytes_per_token=bpt),
                                 serving=ServingResult.model_construct(tokens_per_s=tps, ttft_ms=1.0, batch=4,
                                                                       exposed_copy_ms=0.0, tpot_ms=10.0))
    return p.model_copy(update={"measured": m})


def synthetic_grid() -> tuple[dict, dict]:
    """Loss grows as the kept budget shrinks and with 2-bit KIVI; bytes shrink with both; tokens/s follow bytes."""
    points, built = {}, {}
    for p in bench.enumerate_grid(bench.grid_scenario()):
        keep = float(p.selection.params.get("budget", 1.0))
        bits = {"fp16": 16, "fp8": 8, "int8": 8, "kivi": int(p.codec.params.get("bits", 4))}[p.codec.method]
        loss = (1 - keep) * 0.15 + {16: 0.0, 8: 0.01, 4: 0.05, 2: 0.5}[bits]
        bpt = 1000.0 * keep * bits / 16
        built[p.label()] = _with(p, round(loss, 6), 1e6 / (200 + bpt), bpt)
        bound = 0.5 if bits == 2 else 0.0  # 2-bit KIVI fails the probes: stopped by the slice
        points[p.label()] = {"full_s": 10.0, "probe_s": 2.0, "probe_bound": bound}
    return points, built


def test_grid_is_the_discretized_space() -> None:
    grid = bench.enumerate_grid(bench.grid_scenario())
    labels = [p.label() for p in grid]
    n_sel = 1 + sum(len(bench.GRID_VALUES.get(f"{m}.budget", bench.GRID_VALUES["budget"]))
                    for m in bench.GRID_SELECTION if m != "none")
    n_codec = len(bench.GRID_CODECS) - 1 + len(bench.GRID_VALUES["bits"])
    assert len(labels) == len(set(labels)) == n_sel * n_codec
    assert "none + fp16 @ gpu" in labels and labels[0] == "none + fp16 @ gpu"


def test_scorer_and_replay_against_the_cache() -> None:
    points, built = synthetic_grid()
    scen = bench.grid_scenario()
    scorer = bench.Scorer(list(built.values()), scen)
    assert scorer.score(list(built.values()))["hv_ratio"] == pytest.approx(1.0)
    assert scorer.score([built["none + fp16 @ gpu"]])["hv_ratio"] < 1.0
    assert scorer.grid_pick.label() == choose(list(built.values()), scen)[0].label()
    n = len(built)
    for kind in ("kvtune", "kvtune-cold", "random", "nsga2"):
        marks = bench.replay(kind, 0, points, built, scen, scorer)
        assert [m["budget"] for m in marks] == list(bench.BUDGETS)
        for m in marks:  # plain samplers: one evaluation per distinct candidate, repeats free
            assert m["evaluations"] == max(1, round(m["budget"] * n))
            assert 0.0 <= m["hv_ratio"] <= 1.0 + 1e-9
        assert marks[-1]["hv_ratio"] >= marks[0]["hv_ratio"]


def test_multi_fidelity_costs_the_slice_and_keeps_the_pick() -> None:
    points, built = synthetic_grid()
    scen = bench.grid_scenario()
    scorer = bench.Scorer(list(built.values()), scen)
    marks = bench.replay("kvtune+mf", 0, points, built, scen, scorer)
    for m in marks:  # every candidate costs 1 + 0.2 (slice then full) or 0.2 (stopped): evaluations >= budget
        assert m["evaluations"] >= round(m["budget"] * len(built)) - 1e-9
        steps = round(m["evaluations"] / 0.2, 6)
        assert steps == pytest.approx(round(steps))  # a sum of 0.2 and 1.2 costs
    # a stopped candidate (2-bit KIVI) is infeasible in full, so it is never the grid's pick either
    assert built[scorer.grid_pick.label()].codec.params.get("bits") != 2


def test_run_study_stops_a_hopeless_candidate_after_the_probe_slice(smol, tmp_path) -> None:
    """2-bit KIVI misses a probe the full cache answers: the slice bounds its loss above datacenter's 0.1 ceiling,
    so the trial ends there, infeasible (constraint > 0), with the bound as its loss and no stored pipeline."""
    import dataclasses

    import optuna

    from kvtune.commands.common import load_hardware
    from kvtune.measure.quality import EvalConfig, build_eval_set, probe_loss_bound
    from kvtune.measure.target import build_target
    from kvtune.profile.workload import default_workload
    from kvtune.scenarios import get_scenario
    from kvtune.search import ATTR_STOPPED, SearchContext, run_study
    from kvtune.strategies import Stages

    hw, _ = load_hardware(None, "h100-sxm")
    target = build_target(hardware=hw, workload=default_workload(), loaded=smol, target=None, context=512,
                          tpot_ms=None, default_tpot_ms=100.0)
    cfg = dataclasses.replace(EvalConfig.quick(), multiturn_items=0)
    evalset = build_eval_set(smol.model, smol.tokenizer, cfg, attention_sums=False)
    scen = dataclasses.replace(get_scenario("datacenter"), selection=("none",), codecs=("fp16", "kivi"))
    ctx = SearchContext(model=smol.model, evalset=evalset, eval_config=cfg, target=target, scenario=scen)
    kivi2 = {"selection": "none", "codec": "kivi", "placement": "gpu", "kivi.bits": 2, "kivi.group_size": 32,
             "kivi.residual": 64}
    p2 = Stages.of(Pipeline.model_validate(
        {"schema_version": 1, "codec": {"method": "kivi", "params": {"bits": 2, "group_size": 32, "residual": 64}}}))
    bound = probe_loss_bound(smol.model, evalset, p2, cfg)
    if bound is None or bound <= scen.max_quality_loss:
        pytest.skip(f"2-bit KIVI keeps every probe on this build (bound {bound}); nothing to stop")
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=storage, study_name="mf", directions=["minimize"] * 3)
    study.enqueue_trial(kivi2)
    out = run_study(ctx, trials=1, storage=storage, study_name="mf", model_source=smol.identity)
    assert out.trials == [] and len(out.pruned) == 1 and "stopped after the probe slice" in out.pruned[0][1]
    t = optuna.load_study(study_name="mf", storage=storage).trials[0]
    assert t.state == optuna.trial.TrialState.COMPLETE and t.values[0] == pytest.approx(bound)
    assert t.user_attrs[ATTR_STOPPED] == pytest.approx(bound) and "pipeline" not in t.user_attrs
    assert t.constraints["quality_loss"] == pytest.approx(bound - scen.max_quality_loss)
